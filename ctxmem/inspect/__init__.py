"""Inspect what the memory holds: sessions, timelines, landmarks, search, export/import, plots, reports.

`Inspector` (inspector.py) runs the read, search and delete operations over one Redis and key
prefix. `transfer` exports a session to JSON Lines and imports it back byte for byte; `search`
ranks landmarks by key match with a model; `plots` and `report` draw PNG figures and a
self-contained HTML page. `ctxmem inspect ...` and `ctxmem report` (ctxmem/cli_inspect.py) call
these functions and print their pydantic views, whose field names are the stable JSON keys.
"""

from ctxmem.inspect.inspector import (
    Inspector, LandmarkDetail, LandmarkPage, LandmarkRow, NotFoundError, SessionSummary, Timeline, TurnRow,
)

__all__ = ["Inspector", "LandmarkDetail", "LandmarkPage", "LandmarkRow", "NotFoundError", "SessionSummary",
           "Timeline", "TurnRow"]
