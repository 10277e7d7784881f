"""The part of a streamed reply that is text for the user, without tool-call markup.

While a reply streams, the text before a tool call goes out at once. The call itself, from its
opening marker to its closing one, is held back and parsed when the reply ends. A tail that may
be the start of a marker waits for the next token. The text let out is exactly the
parsed reply's content, so the streamed chunks add up to what `invoke` returns.
"""

from __future__ import annotations

from ctxmem.toolcalls import ToolSyntax


class VisibleText:
    """Accumulates raw reply text and returns the part that may be shown so far."""

    def __init__(self, syntax: ToolSyntax | None, forced: str = ""):
        self.syntax, self.raw = syntax, forced  # a forced call opening is part of the reply's text

    def add(self, piece: str) -> str:
        """Append a raw piece; return the visible text so far (it only grows)."""
        self.raw += piece
        if self.syntax is None:
            return self.raw
        if not self.syntax.open:
            # A template without markers writes a call as bare JSON: hold a reply that starts like one.
            return "" if self.raw.lstrip().startswith("{") or not self.raw.strip() else self.raw
        return _outside_calls(self.raw, self.syntax.open, self.syntax.close)


def _outside_calls(text: str, opening: str, closing: str) -> str:
    """Return `text` without complete or open call blocks, and without a tail that may open one."""
    visible, rest = "", text
    while (start := rest.find(opening)) >= 0:
        visible += rest[:start]
        end = rest.find(closing, start + len(opening)) if closing else -1
        if end < 0:
            return visible
        rest = rest[end + len(closing):]
    for size in range(min(len(opening) - 1, len(rest)), 0, -1):
        if rest.endswith(opening[:size]):
            return visible + rest[:-size]
    return visible + rest
