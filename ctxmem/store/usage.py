"""Landmark usage counters in Redis: how often each landmark was injected, and the attention it received.

The counters live in one hash per session, `{prefix}:{<session>}:usage`, with the fields
"<i>:injected" (an integer, HINCRBY) and "<i>:mass" (a float, HINCRBYFLOAT) for landmark i. They
sit beside the landmark blobs rather than inside their records, so a landmark's blob is written
once and keeps its bytes (and checksum) however often the landmark is used. The record fields
`injected` and `attention_mass` therefore stay at their values of creation (0).

`LandmarkStore.delete` removes the fields of a deleted landmark and the whole hash with the session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from ctxmem.store.keys import KeySchema, validate_session_id
from ctxmem.store.landmarks import UNREACHABLE_ERRORS

logger = logging.getLogger(__name__)


@dataclass
class LandmarkUsage:
    """One landmark's counters: placements in a cache, and attention mass received (see LandmarkMemory)."""

    injected: int = 0
    mass: float = 0.0


class UsageStore:
    """Reads and increments the usage hash of each session under one key prefix."""

    def __init__(self, client: redis.Redis, keys: KeySchema, ttl_seconds: int | None = None):
        self.client, self.keys, self.ttl_seconds = client, keys, ttl_seconds

    def add(self, session_id: str, counts: dict[int, LandmarkUsage]) -> None:
        """Add `counts` to the stored counters in one round trip.

        Raises ConnectionError when Redis is unreachable; the caller keeps the counts and retries.
        """
        key = self.keys.usage(validate_session_id(session_id))
        pipeline = self.client.pipeline(transaction=True)
        for index, usage in counts.items():
            if usage.injected:
                pipeline.hincrby(key, f"{index}:injected", usage.injected)
            if usage.mass:
                pipeline.hincrbyfloat(key, f"{index}:mass", usage.mass)
        if self.ttl_seconds:
            pipeline.expire(key, self.ttl_seconds)
        try:
            pipeline.execute()
        except UNREACHABLE_ERRORS as error:
            raise ConnectionError(f"cannot reach Redis to store the landmark usage of session {session_id!r}: "
                                  f"{error}") from error

    def read(self, session_id: str) -> dict[int, LandmarkUsage]:
        """Return the counters of every landmark that has any, by landmark index."""
        return parse_fields(self.read_raw(session_id))

    def read_raw(self, session_id: str) -> dict[bytes, bytes]:
        """Return the hash as stored, field and value bytes unchanged (for export)."""
        return self.client.hgetall(self.keys.usage(validate_session_id(session_id)))


def parse_fields(fields: dict[bytes, bytes]) -> dict[int, LandmarkUsage]:
    """Turn raw hash fields "<i>:injected" and "<i>:mass" into counters by index; unknown fields are skipped."""
    counters: dict[int, LandmarkUsage] = {}
    for field, value in fields.items():
        index, _, name = field.decode().partition(":")
        if not index.isdigit() or name not in ("injected", "mass"):
            logger.warning("skipped the unknown usage field %r", field)
            continue
        usage = counters.setdefault(int(index), LandmarkUsage())
        if name == "injected":
            usage.injected = int(value)
        else:
            usage.mass = float(value)
    return counters
