"""Read-only views of what the stores hold: sessions, a session's timeline, landmarks, one landmark.

Every view is a pydantic model, and `model_dump(mode="json")` of it is what `ctxmem inspect ...
--json` prints, so the field names below are the stable JSON keys. Landmarks are read page by
page through the session's landmark index (a sorted set scored by index) with ZRANGE BYSCORE
... LIMIT and pipelined GETs; sessions are found with SCAN over meta keys. Nothing uses KEYS.
"""

from __future__ import annotations

import json
import logging
import math
from bisect import bisect_right
from datetime import datetime, timezone
from typing import Iterator, Literal

import msgpack
import redis
import torch
from pydantic import BaseModel

from ctxmem.inspect.tensors import LayerStats, layer_stats, mean_norm
from ctxmem.store.codec import DTYPES
from ctxmem.store.connection import client_for
from ctxmem.store.keys import DEFAULT_PREFIX, KeySchema, validate_index, validate_session_id
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.records import Landmark, LandmarkMismatchError
from ctxmem.store.sessions import SessionStore
from ctxmem.store.usage import LandmarkUsage, UsageStore

logger = logging.getLogger(__name__)

PAGE_SIZE = 1000  # landmarks read per round trip
PREVIEW_CHARACTERS = 60
LISTED_FIELDS = ("session_id", "index", "token_start", "token_end", "text", "created", "dtype", "compression")


class NotFoundError(ValueError):
    """The requested session or landmark is not stored under the prefix."""


class SessionSummary(BaseModel):
    """One row of `ctxmem inspect sessions`.

    `kind` is "conversation" for a session with a committed state (chat, MemoryManager) and
    "landmarks" for landmarks without a conversation (`ctxmem run --session`). The numbers from
    the state (turns, tokens_seen, saturation, entries_used, budget) are those after the last
    committed turn, and None for a "landmarks" session. `updated` is an ISO 8601 UTC time.
    """

    session: str
    kind: Literal["conversation", "landmarks"]
    messages: int
    turns: int | None
    tokens_seen: int | None
    landmarks: int
    chunks: int
    saturation: float | None
    entries_used: int | None
    budget: int | None
    updated: str | None


class TurnRow(BaseModel):
    """One committed turn of a conversation: the saturation after it, and what it evicted and created."""

    turn: int
    time: str  # ISO 8601 UTC, when the turn committed
    tokens_seen: int
    entries_used: int
    budget: int
    saturation: float
    evicted_tokens: int  # in total, after this turn
    evictions: int  # eviction events in this turn
    landmarks_created: int  # landmarks whose chunk ended within this turn's tokens


class LandmarkCreation(BaseModel):
    """When and from which tokens one landmark was created."""

    index: int
    created: str  # ISO 8601 UTC
    token_start: int
    token_end: int


class Timeline(BaseModel):
    """`ctxmem inspect session ID`: the session's turns and landmark creations, oldest first."""

    session: str
    kind: Literal["conversation", "landmarks"]
    messages: int
    turns: list[TurnRow]
    landmarks: list[LandmarkCreation]


class LandmarkRow(BaseModel):
    """One row of `ctxmem inspect landmarks ID`.

    `bytes` is the stored blob's size, `key_norm` the mean L2 norm of its key entries (without
    RoPE) over layers and KV heads. `injected` and `attention_mass` come from the usage hash
    and stay 0 unless attention statistics were on (see ctxmem.store.usage).
    """

    index: int
    token_start: int
    token_end: int
    preview: str  # the source text on one line, cut to 60 characters
    text: str
    created: str  # ISO 8601 UTC
    dtype: str
    compression: str
    bytes: int
    key_norm: float
    injected: int
    attention_mass: float


class LandmarkPage(BaseModel):
    """A page of landmarks: rows from `offset` on, and the session's landmark count."""

    session: str
    total: int
    offset: int
    landmarks: list[LandmarkRow]


class LandmarkDetail(BaseModel):
    """`ctxmem inspect landmark ID N`: the full record, blob size, usage, chunk and per-layer statistics."""

    session: str
    record: dict  # the stored LandmarkRecord, as JSON
    bytes: int
    injected: int
    attention_mass: float
    chunk_stored: bool  # whether the chunk's full KV is stored beside the landmark
    layers: list[LayerStats]


def preview(text: str, width: int = PREVIEW_CHARACTERS) -> str:
    """Return `text` on one line, lines joined by " / ", cut to `width` characters with an ellipsis."""
    line = " / ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= width else line[:width - 1] + "…"


def iso_time(value: float | datetime | bytes | str | None) -> str | None:
    """Return a Unix time, datetime or stored ISO string as ISO 8601 UTC (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return datetime.fromtimestamp(value, timezone.utc).isoformat()


class Inspector:
    """The read, search and delete operations behind `ctxmem inspect`, over one Redis and prefix.

    `client_or_url` is a redis.Redis client, a URL, or None for $CTXMEM_REDIS_URL, else the
    embedded server (see ctxmem.store.connection.connect).
    """

    def __init__(self, client_or_url: redis.Redis | str | None = None, prefix: str = DEFAULT_PREFIX):
        self.client = client_for(client_or_url)
        self.keys = KeySchema(prefix)
        self.landmark_store = LandmarkStore(self.client, prefix=prefix)
        self.session_store = SessionStore(self.client, prefix=prefix)
        self.usage_store = UsageStore(self.client, self.keys)

    # Sessions

    def session_ids(self) -> list[str]:
        """Return every session id under the prefix, sorted (SCAN over meta keys)."""
        return self.landmark_store.scan_sessions()

    def sessions(self) -> list[SessionSummary]:
        """Return a summary of every session under the prefix, sorted by id."""
        return [self.summary(session_id) for session_id in self.session_ids()]

    def summary(self, session_id: str) -> SessionSummary:
        """Return the summary of one session; raise NotFoundError if nothing is stored for it."""
        session_id = self.require_session(session_id)
        keys = self.keys
        pipeline = self.client.pipeline(transaction=False)
        pipeline.llen(keys.messages(session_id))
        pipeline.zcard(keys.landmarks(session_id))
        pipeline.zcard(keys.chunks(session_id))
        pipeline.hget(keys.meta(session_id), "updated")
        messages, landmarks, chunks, updated = pipeline.execute()
        state = self.session_store.load_state(session_id)
        last = state["history"][-1] if state and state["history"] else None
        return SessionSummary(
            session=session_id, kind="conversation" if state else "landmarks", messages=messages,
            turns=len(state["history"]) if state else None,
            tokens_seen=last["tokens_seen"] if last else None, landmarks=landmarks, chunks=chunks,
            saturation=last["fraction"] if last else None, entries_used=last["entries_used"] if last else None,
            budget=last["budget"] if last else None, updated=iso_time(updated),
        )

    def require_session(self, session_id: str) -> str:
        """Return the validated id; raise NotFoundError naming it when nothing is stored for it."""
        session_id = validate_session_id(session_id)
        keys = self.keys
        if not self.client.exists(keys.meta(session_id), keys.state(session_id), keys.messages(session_id),
                                  keys.landmarks(session_id)):
            raise NotFoundError(f"session {session_id!r} not found under prefix {keys.prefix!r}; "
                                "list the stored sessions with `ctxmem inspect sessions`")
        return session_id

    def timeline(self, session_id: str) -> Timeline:
        """Return the session's turns (from the saturation history of its state) and landmark creations."""
        summary = self.summary(session_id)
        state = self.session_store.load_state(summary.session)
        creations = [LandmarkCreation(index=landmark.record.index, created=iso_time(landmark.record.created),
                                      token_start=landmark.record.token_start, token_end=landmark.record.token_end)
                     for landmark in self.iter_landmarks(summary.session)]
        history = state["history"] if state else []
        return Timeline(session=summary.session, kind=summary.kind, messages=summary.messages,
                        turns=turn_rows(history, creations), landmarks=creations)

    # Landmarks

    def iter_landmarks(self, session_id: str, start: int = 0) -> Iterator[Landmark]:
        """Yield the session's landmarks from index `start` on, verified, reading PAGE_SIZE per round trip."""
        for page in self._blob_pages(session_id, start):
            for index, blob in page:
                yield Landmark.from_blob(blob, session_id, index)

    def landmarks(self, session_id: str, offset: int = 0, limit: int | None = None) -> LandmarkPage:
        """Return `limit` landmark rows (None: all) from the `offset`-th stored landmark on."""
        session_id = self.require_session(session_id)
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"invalid offset {offset} or limit {limit}: use 0 or more")
        total = self.client.zcard(self.keys.landmarks(session_id))
        usage = self.usage_store.read(session_id)
        rows: list[LandmarkRow] = []
        wanted = total - offset if limit is None else limit
        for page in self._blob_pages(session_id, 0, offset=offset, count=wanted):
            rows += landmark_rows(session_id, page, usage)
        return LandmarkPage(session=session_id, total=total, offset=offset, landmarks=rows)

    def landmark(self, session_id: str, index: int) -> LandmarkDetail:
        """Return landmark `index` with its full record, usage and per-layer tensor statistics."""
        session_id = self.require_session(session_id)
        index = validate_index(index)
        blob = self.client.get(self.keys.landmark(session_id, index))
        if blob is None:
            raise NotFoundError(f"session {session_id!r} has no landmark {index}; list its landmarks with "
                                f"`ctxmem inspect landmarks {session_id}`")
        landmark = Landmark.from_blob(blob, session_id, index)
        usage = self.usage_store.read(session_id).get(index, LandmarkUsage())
        return LandmarkDetail(
            session=session_id, record=landmark.record.model_dump(mode="json"), bytes=len(blob),
            injected=usage.injected, attention_mass=usage.mass,
            chunk_stored=bool(self.client.exists(self.keys.chunk(session_id, index))),
            layers=layer_stats(landmark.keys, landmark.values),
        )

    def _blob_pages(self, session_id: str, start: int, offset: int = 0,
                    count: int | None = None) -> Iterator[list[tuple[int, bytes]]]:
        """Yield lists of (index, blob) of stored landmarks with index >= `start`, in index order.

        `offset` skips that many landmarks first and `count` stops after that many (None: all).
        A landmark deleted between the index read and its GET is skipped.
        """
        index_key = self.keys.landmarks(session_id)
        remaining = count
        while remaining is None or remaining > 0:
            size = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            members = self.client.zrangebyscore(index_key, start, "+inf", start=offset, num=size)
            if not members:
                return
            indices = [int(member) for member in members]
            blobs = self.client.mget([self.keys.landmark(session_id, index) for index in indices])
            yield [(index, blob) for index, blob in zip(indices, blobs) if blob is not None]
            start, offset = indices[-1] + 1, 0
            remaining = None if remaining is None else remaining - len(indices)

    def usage(self, session_id: str) -> dict[int, LandmarkUsage]:
        """Return the usage counters of the session's landmarks, by index (see ctxmem.store.usage)."""
        return self.usage_store.read(self.require_session(session_id))

    # Search and delete

    def search_text(self, session_id: str, text: str, limit: int = 10) -> list[dict]:
        """Return the landmarks whose source text contains `text` (case-insensitive), oldest first.

        Each hit is {"index", "token_start", "token_end", "preview", "score"}, where the score is
        the number of occurrences.
        """
        session_id = self.require_session(session_id)
        if not text.strip():
            raise ValueError("the search text is empty; pass the words to look for")
        needle = text.casefold()
        hits = []
        for landmark in self.iter_landmarks(session_id):
            record = landmark.record
            occurrences = record.text.casefold().count(needle)
            if occurrences:
                hits.append({"index": record.index, "token_start": record.token_start,
                             "token_end": record.token_end, "preview": preview(record.text),
                             "score": float(occurrences)})
                if len(hits) == limit:
                    break
        return hits

    def delete(self, session_id: str, index: int | None = None) -> int:
        """Delete the whole session, or only landmark `index` (with its chunk); return the keys removed.

        A single landmark of a conversation cannot be deleted, because the session's state
        lists every landmark and would fail to resume without it.
        """
        session_id = self.require_session(session_id)
        if index is None:
            removed = self.landmark_store.delete(session_id)
            return removed + self.session_store.delete(session_id)
        index = validate_index(index)
        if not self.client.exists(self.keys.landmark(session_id, index)):
            raise NotFoundError(f"session {session_id!r} has no landmark {index}; list its landmarks with "
                                f"`ctxmem inspect landmarks {session_id}`")
        if self.client.exists(self.keys.state(session_id)):
            raise ValueError(f"session {session_id!r} is a conversation, and its state needs landmark {index} "
                             "to resume; delete the whole session instead (without --landmark)")
        return self.landmark_store.delete(session_id, index)


def landmark_rows(session_id: str, page: list[tuple[int, bytes]],
                  usage: dict[int, LandmarkUsage]) -> list[LandmarkRow]:
    """Return the rows of one page of (index, blob), key norms computed for the whole page at once.

    This is the listing's fast path, which keeps 10,000 rows near a second on 2 CPU cores. It
    reads the record fields that a row shows, checks that the blob belongs under its key, and
    decodes only the keys. It does not validate the whole record or verify the tensor
    checksums, which `Inspector.landmark`, search and import do.
    """
    records, keys = [], []
    for index, blob in page:
        record, key_fields = parse_listing_blob(blob, session_id, index)
        records.append((record, len(blob)))
        keys.append(key_fields)
    rows = []
    for (record, size), norm in zip(records, key_norms(keys)):
        counters = usage.get(record["index"]) or LandmarkUsage()
        rows.append(LandmarkRow(
            index=record["index"], token_start=record["token_start"], token_end=record["token_end"],
            preview=preview(record["text"]), text=record["text"], created=record["created"].replace("Z", "+00:00"),
            dtype=record["dtype"], compression=record["compression"], bytes=size, key_norm=norm,
            injected=counters.injected, attention_mass=counters.mass,
        ))
    return rows


def parse_listing_blob(blob: bytes, session_id: str, index: int) -> tuple[dict, list]:
    """Return the record dict of a landmark blob and its keys' [dtype, shape, raw bytes], undecoded."""
    try:
        fields = msgpack.unpackb(blob, raw=False, strict_map_key=False)  # tensors stay msgpack.ExtType
        record = json.loads(fields["record"])
        key_fields = msgpack.unpackb(fields["keys"].data, raw=False)
        missing = [name for name in LISTED_FIELDS if name not in record]
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as error:
        raise LandmarkMismatchError(session_id, index, f"invalid blob: {error}") from error
    if missing:
        raise LandmarkMismatchError(session_id, index, f"invalid record: missing {', '.join(missing)}")
    if not valid_tensor_fields(key_fields):
        raise LandmarkMismatchError(session_id, index, "invalid blob: the keys are not a valid tensor")
    if (record["session_id"], record["index"]) != (session_id, index):
        raise LandmarkMismatchError(session_id, index, f"the blob contains session {record['session_id']!r} "
                                    f"landmark {record['index']}, so it is stored under the wrong key")
    return record, key_fields


def valid_tensor_fields(fields: object) -> bool:
    """Return whether `fields` is a tensor's [dtype, shape, raw bytes] whose size matches dtype and shape."""
    if not isinstance(fields, list) or len(fields) != 3 or fields[0] not in DTYPES:
        return False
    dtype, shape, raw = fields
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        return False
    return isinstance(raw, bytes) and len(raw) == math.prod(shape) * DTYPES[dtype].itemsize


def key_norms(keys: list[list]) -> list[float]:
    """Return the mean L2 norm of each key tensor's entry vectors, from their [dtype, shape, raw bytes].

    Tensors of one dtype and shape, as in any one session, are decoded and reduced together.
    """
    if keys and all(key[:2] == keys[0][:2] for key in keys):
        dtype, shape = DTYPES[keys[0][0]], keys[0][1]
        stacked = torch.frombuffer(bytearray(b"".join(key[2] for key in keys)), dtype=torch.uint8)
        stacked = stacked.view(dtype).reshape(len(keys), *shape).float()  # [n, layers, kv_heads, entries, head_dim]
        return stacked.norm(dim=-1).flatten(1).mean(dim=1).tolist()
    return [mean_norm(torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(DTYPES[dtype]).reshape(shape))
            for dtype, shape, raw in keys]


def turn_rows(history: list[dict], creations: list[LandmarkCreation]) -> list[TurnRow]:
    """Return one TurnRow per history entry; a landmark counts in the first turn committed after its creation."""
    rows, previous_events, previous_time = [], 0, float("-inf")
    created_times = sorted(datetime.fromisoformat(creation.created).timestamp() for creation in creations)
    for entry in history:
        created = bisect_right(created_times, entry["time"]) - bisect_right(created_times, previous_time)
        rows.append(TurnRow(
            turn=entry["turn"], time=iso_time(entry["time"]), tokens_seen=entry["tokens_seen"],
            entries_used=entry["entries_used"], budget=entry["budget"], saturation=entry["fraction"],
            evicted_tokens=entry["evicted_tokens"], evictions=entry["eviction_events"] - previous_events,
            landmarks_created=created,
        ))
        previous_events, previous_time = entry["eviction_events"], entry["time"]
    return rows
