"""Saturation: how full a session's KV budget is, and how much of the stream it has dropped."""

from __future__ import annotations

from pydantic import BaseModel, computed_field


class Saturation(BaseModel):
    """A snapshot of one session's cache use. `fraction` is entries used over the budget."""

    tokens_seen: int
    entries_used: int
    peak_entries: int  # the most entries in use at any point, between forwards
    budget: int
    pinned: int
    landmarks: int  # landmark entries in the cache
    retrieved: int = 0  # entries of chunks restored by the retrieve policy
    window_tokens: int
    evicted_tokens: int
    eviction_events: int

    @computed_field
    @property
    def fraction(self) -> float:
        return self.entries_used / self.budget if self.budget else 0.0
