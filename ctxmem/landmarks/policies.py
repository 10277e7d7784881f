"""Landmark selection policies: which stored landmarks fill the cache's landmark slots.

A policy gets the landmarks built so far (oldest first) and the number it may place, and
returns their positions in that list, in the order they take the slots.
NOTE: only `recent` is built. `relevant` (scored against the current queries) and `retrieve`
(whole chunks restored into a retrieval region) are planned behind the same interface.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ctxmem.store.records import Landmark


class Policy(Protocol):
    name: str

    def select(self, landmarks: Sequence[Landmark], count: int) -> list[int]: ...


class Recent:
    """The `count` newest landmarks, oldest first, so slot order follows text order."""

    name = "recent"

    def select(self, landmarks: Sequence[Landmark], count: int) -> list[int]:
        return list(range(max(0, len(landmarks) - count), len(landmarks)))


POLICIES = {"recent": Recent}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown landmark policy {name!r}; use one of: {', '.join(POLICIES)}")
    return POLICIES[name]()
