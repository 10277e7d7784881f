"""Plots of one session, drawn with matplotlib's Agg backend to PNG.

Four panels: saturation over the tokens seen (per committed turn), evicted tokens, landmark
creation over time, and the attention mass and injections of each landmark. A panel without
data shows the reason instead, for example that a session written by `ctxmem run` has no turns.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

from ctxmem.inspect.inspector import Inspector, Timeline
from ctxmem.store.usage import LandmarkUsage

FIGURE_SIZE = (11.0, 7.5)  # inches
DPI = 100


def _figure_module():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("plots need matplotlib: install it with `pip install 'ctxmem[plot]'`") from error
    return Figure, FigureCanvasAgg


def session_png(inspector: Inspector, session_id: str) -> bytes:
    """Return the session's four-panel figure as PNG bytes."""
    timeline = inspector.timeline(session_id)
    usage = inspector.usage(timeline.session)
    Figure, FigureCanvasAgg = _figure_module()
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    saturation, evictions, creation, attention = figure.subplots(2, 2).flat
    _plot_saturation(saturation, timeline)
    _plot_evictions(evictions, timeline)
    _plot_creation(creation, timeline)
    _plot_attention(attention, timeline, usage)
    figure.suptitle(f"session {timeline.session} ({timeline.kind}, {len(timeline.landmarks)} landmarks)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_session(inspector: Inspector, session_id: str, path: str | Path) -> Path:
    """Write the session's figure to `path` as PNG; return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"invalid plot file {str(path)!r}: the plot is a PNG, so name it *.png")
    png = session_png(inspector, session_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def _empty(axes, title: str, reason: str) -> None:
    axes.set_title(title)
    axes.text(0.5, 0.5, reason, ha="center", va="center", transform=axes.transAxes, wrap=True, color="0.4")
    axes.set_xticks([])
    axes.set_yticks([])


def _plot_saturation(axes, timeline: Timeline) -> None:
    title = "saturation after each turn"
    if not timeline.turns:
        _empty(axes, title, "no committed turns:\nthe landmarks were written by `ctxmem run`")
        return
    tokens = [turn.tokens_seen for turn in timeline.turns]
    axes.plot(tokens, [turn.saturation for turn in timeline.turns], marker="o", markersize=3)
    axes.set_ylim(0, 1.05)
    axes.set_title(title)
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("entries used / budget")
    axes.grid(alpha=0.3)


def _plot_evictions(axes, timeline: Timeline) -> None:
    title = "evicted tokens"
    if timeline.turns:
        tokens = [turn.tokens_seen for turn in timeline.turns]
        evicted = [turn.evicted_tokens for turn in timeline.turns]
        label = "after each turn"
    elif timeline.landmarks:
        # Without turns, each landmark stands for one evicted chunk.
        tokens, evicted, total = [], [], 0
        for landmark in timeline.landmarks:
            total += landmark.token_end - landmark.token_start
            tokens.append(landmark.token_end)
            evicted.append(total)
        label = "one step per landmark"
    else:
        _empty(axes, title, "nothing evicted yet")
        return
    axes.step(tokens, evicted, where="post", label=label)
    axes.set_title(title)
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("evicted tokens")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)


def _plot_creation(axes, timeline: Timeline) -> None:
    title = "landmark creation"
    if not timeline.landmarks:
        _empty(axes, title, "no landmarks stored")
        return
    times = [datetime.fromisoformat(landmark.created) for landmark in timeline.landmarks]
    first = min(times)
    seconds = sorted((moment - first).total_seconds() for moment in times)
    axes.step(seconds, range(1, len(seconds) + 1), where="post")
    axes.set_title(title)
    axes.set_xlabel("seconds after the first landmark")
    axes.set_ylabel("landmarks created")
    axes.grid(alpha=0.3)


def _plot_attention(axes, timeline: Timeline, usage: dict[int, LandmarkUsage]) -> None:
    title = "attention on landmarks"
    if not usage:
        _empty(axes, title, "no attention statistics:\nturn them on with --attention-stats\n"
                            "or LandmarkConfig(attention_stats=True)")
        return
    indices = [landmark.index for landmark in timeline.landmarks]
    mass = [usage.get(index, LandmarkUsage()).mass for index in indices]
    injected = [usage.get(index, LandmarkUsage()).injected for index in indices]
    axes.fill_between(indices, mass, step="mid", alpha=0.6, label="attention mass")
    axes.set_title(title)
    axes.set_xlabel("landmark index")
    axes.set_ylabel("attention mass (query tokens)")
    injections = axes.twinx()
    injections.plot(indices, injected, color="tab:red", drawstyle="steps-mid", label="times injected")
    injections.set_ylabel("times injected")
    handles = axes.get_legend_handles_labels()[0] + injections.get_legend_handles_labels()[0]
    axes.legend(handles, [handle.get_label() for handle in handles], loc="upper left")
    axes.grid(alpha=0.3)
