"""A session's report as one self-contained HTML file: tables and the plots, with no network reference.

The figure is embedded as a base64 `data:image/png` URI and the style sheet is inline, so the
file opens offline and can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path

from ctxmem.inspect.inspector import Inspector
from ctxmem.inspect.plots import session_png

LANDMARK_ROWS = 500  # the newest landmarks shown; the rest are in `ctxmem inspect landmarks --json`

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef; } td.text { text-align: left; font-family: monospace; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #ddd; }
p.note { color: #666; }
"""


def render_report(inspector: Inspector, session_id: str, landmark_rows: int = LANDMARK_ROWS) -> str:
    """Return the HTML report of one session."""
    summary = inspector.summary(session_id)
    timeline = inspector.timeline(summary.session)
    first = max(0, summary.landmarks - landmark_rows)
    page = inspector.landmarks(summary.session, offset=first, limit=landmark_rows)
    figure = base64.b64encode(session_png(inspector, summary.session)).decode("ascii")

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ctxmem session {html.escape(summary.session)}</title><style>{STYLE}</style></head><body>",
        f"<h1>ctxmem session {html.escape(summary.session)}</h1>",
        f'<p class="note">Redis prefix {html.escape(inspector.keys.prefix)}; report written '
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>",
        "<h2>Summary</h2>", _table(["field", "value"], [[name, value] for name, value in summary.model_dump().items()]),
        "<h2>Plots</h2>", f'<img alt="saturation, evictions, landmark creation and attention" '
                          f'src="data:image/png;base64,{figure}">',
        "<h2>Turns</h2>",
    ]
    if timeline.turns:
        turn_fields = ["turn", "time (UTC)", *list(timeline.turns[0].model_dump())[2:]]
        rows = [[turn.turn, turn.time[:19].replace("T", " "), *list(turn.model_dump().values())[2:]]
                 for turn in timeline.turns]
        parts.append(_table(turn_fields, rows))
    else:
        parts.append('<p class="note">No committed turns: the landmarks were written by <code>ctxmem run</code>.</p>')

    parts.append("<h2>Landmarks</h2>")
    if first:
        parts.append(f'<p class="note">The newest {len(page.landmarks)} of {page.total} landmarks; '
                     "<code>ctxmem inspect landmarks --json --limit 0</code> lists them all.</p>")
    headers = ["index", "tokens", "created", "bytes", "key norm", "injected", "attention mass", "source text"]
    rows = [[row.index, f"{row.token_start}-{row.token_end}", row.created[:19], row.bytes, f"{row.key_norm:.3f}",
             row.injected, f"{row.attention_mass:.4f}", row.preview] for row in page.landmarks]
    parts += [_table(headers, rows, text_column=len(headers) - 1), "</body></html>"]
    return "\n".join(parts)


def write_report(inspector: Inspector, session_id: str, path: str | Path) -> Path:
    """Write the report of one session to `path` (*.html); return the path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"invalid report file {str(path)!r}: the report is HTML, so name it *.html")
    text = render_report(inspector, session_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _table(headers: list[str], rows: list[list], text_column: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(header))}</th>" for header in headers)
    body = []
    for row in rows:
        cells = []
        for position, value in enumerate(row):
            css = ' class="text"' if position == text_column else ""
            cells.append(f"<td{css}>{html.escape(_format(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _format(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
