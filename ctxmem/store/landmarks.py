"""The landmark store: landmarks and chunk KV of each session in Redis, under `KeySchema` keys.

Every write runs as one Lua script over the keys of one session, which share a hash slot. The
script stores the payload, then the index entry that points at it, then the session's meta
hash, and applies the TTL to every key of the session. A ZADD to `{prefix}:sessions`, which
lives in another slot, follows the script. The script never overwrites a stored payload with
different bytes unless the caller passes replace=True, so writing the same landmark twice is
harmless.

Writes survive a Redis outage: a put that cannot reach the server queues the encoded payload in
memory, up to `max_pending` writes and `max_pending_bytes`, and the next put, read or `flush()`
sends the queue first, in order. Reads during an outage raise ConnectionError.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

import redis

from ctxmem.store.connection import client_for, describe
from ctxmem.store.keys import DEFAULT_PREFIX, KeySchema, validate_index, validate_session_id
from ctxmem.store.records import (
    SCHEMA_VERSION, Chunk, Landmark, LandmarkMismatchError, ModelFingerprint, check_compatible,
    fingerprint_differences, utc_now, verify,
)

logger = logging.getLogger(__name__)

PutStatus = Literal["stored", "unchanged", "replaced", "pending"]
Kind = Literal["landmark", "chunk"]
T = TypeVar("T")

# redis-py raises these when the server cannot be reached; BusyLoadingError, a server still
# loading its data after a restart, is a subclass of redis.ConnectionError.
UNREACHABLE_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# KEYS: payload, index sorted set of the payload's kind, meta, landmarks index, chunks index.
# ARGV: blob, index, fingerprint JSON, time (ISO 8601), TTL seconds (0: none), replace ("1"/"0"),
#       schema version, landmark key without index, chunk key without index.
# Returns {status, detail}: status "stored", "unchanged" or "replaced", or "conflict", or
# "fingerprint" with the session's fingerprint JSON as detail.
# NOTE: the TTL loop builds payload keys from ARGV. They share the session's hash slot, but
# Redis Cluster documents scripts that touch undeclared keys as unsupported.
PUT_SCRIPT = """
local payload, index_key, meta = KEYS[1], KEYS[2], KEYS[3]
local blob, index, fingerprint = ARGV[1], ARGV[2], ARGV[3]

local session_fingerprint = redis.call('HGET', meta, 'fingerprint')
if session_fingerprint and session_fingerprint ~= fingerprint then
  return {'fingerprint', session_fingerprint}
end

local status = 'stored'
local existing = redis.call('GET', payload)
if existing then
  if existing == blob then
    status = 'unchanged'
  elseif ARGV[6] == '1' then
    status = 'replaced'
  else
    return {'conflict', ''}
  end
end

redis.call('SET', payload, blob)
redis.call('ZADD', index_key, index, index)
redis.call('HSET', meta, 'schema_version', ARGV[7], 'fingerprint', fingerprint, 'updated', ARGV[4])
redis.call('HSETNX', meta, 'created', ARGV[4])

local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('EXPIRE', meta, ttl)
  for position, key_prefix in ipairs({ARGV[8], ARGV[9]}) do
    local index_set = KEYS[3 + position]
    for _, member in ipairs(redis.call('ZRANGE', index_set, 0, -1)) do
      redis.call('EXPIRE', key_prefix .. member, ttl)
    end
    redis.call('EXPIRE', index_set, ttl)
  end
end
return {status, ''}
"""

# KEYS: meta, landmarks index, chunks index, usage hash. ARGV: landmark key without index, chunk
# key without index, the index to delete or "" for the whole session. Returns the keys removed.
DELETE_SCRIPT = """
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[3] .. ':injected', ARGV[3] .. ':mass')
  return redis.call('DEL', ARGV[1] .. ARGV[3], ARGV[2] .. ARGV[3])
end

local removed = 0
for position, key_prefix in ipairs({ARGV[1], ARGV[2]}) do
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1 + position], 0, -1)) do
    removed = removed + redis.call('DEL', key_prefix .. member)
  end
end
return removed + redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
"""


class LandmarkNotFoundError(KeyError):
    """No landmark or chunk is stored under the requested session and index."""


@dataclass(frozen=True)
class PendingWrite:
    """An encoded landmark or chunk waiting for Redis to come back."""

    kind: Kind
    session_id: str
    index: int
    blob: bytes
    fingerprint_json: str
    replace: bool


class LandmarkStore:
    """Landmarks and chunk KV of many sessions in one Redis database.

    Parameters:
        client_or_url: a `redis.Redis` client created with decode_responses=False, a
            redis://, rediss:// or unix:// URL, or None for $CTXMEM_REDIS_URL or else the
            embedded server (see `ctxmem.store.connection.connect`).
        prefix: the first part of every key; see `ctxmem.store.keys`.
        ttl_seconds: when set, every write gives every key of its session this time to live.
        max_pending: writes kept in memory while Redis is unreachable; the oldest is dropped
            beyond it.
        max_pending_bytes: total payload bytes kept in memory while Redis is unreachable.

    NOTE: the queue of pending writes has no lock, so one store must not be shared between
    threads. A server that accepts connections but never responds blocks each call for the
    client's socket timeout, which is 5 s with redis-py 8.2 defaults. A put that times out is
    queued.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str | None = None,
        prefix: str = DEFAULT_PREFIX,
        ttl_seconds: int | None = None,
        max_pending: int = 1024,
        max_pending_bytes: int = 256 * 2**20,
    ):
        self.keys = KeySchema(prefix)
        self.ttl_seconds = _positive_or_none("ttl_seconds", ttl_seconds)
        self.max_pending = _positive("max_pending", max_pending)
        self.max_pending_bytes = _positive("max_pending_bytes", max_pending_bytes)
        self.client = client_for(client_or_url)
        self.where = describe(self.client)  # host, port and db, never the password
        self._put_script = self.client.register_script(PUT_SCRIPT)
        self._delete_script = self.client.register_script(DELETE_SCRIPT)
        self._pending: deque[PendingWrite] = deque()
        self._pending_bytes = 0
        self._unreachable = False  # set by the first failed write of an outage
        self._flushed_in_outage = 0

    @property
    def pending_count(self) -> int:
        """Number of writes queued in memory until Redis is reachable again."""
        return len(self._pending)

    # Writes

    def put(self, landmark: Landmark, replace: bool = False) -> PutStatus:
        """Store `landmark` under its session and index; return what happened.

        Returns "stored", "unchanged" (the same bytes were already stored), "replaced" (only
        with replace=True), or "pending" when Redis is unreachable and the write is queued.
        Raises LandmarkMismatchError when the tensors fail their record's checks, when another
        landmark is stored under the index and replace is False, or when the session contains
        landmarks of another model.
        """
        _check_type("landmark", landmark, Landmark)
        verify(landmark)
        return self._submit(self._pending_write("landmark", landmark, replace))

    def put_chunk(self, chunk: Chunk, replace: bool = False) -> PutStatus:
        """Store a chunk's full keys and values; statuses and errors as for `put`."""
        _check_type("chunk", chunk, Chunk)
        verify(chunk)
        return self._submit(self._pending_write("chunk", chunk, replace))

    def put_blob(self, kind: Kind, blob: bytes, session_id: str, index: int, replace: bool = False) -> PutStatus:
        """Store an encoded landmark or chunk exactly as given, after decoding and verifying it.

        This is how an export comes back byte for byte (see ctxmem.inspect.transfer). The blob
        must decode to a valid record stored under (`session_id`, `index`); statuses and errors
        as for `put`.
        """
        item_type = Landmark if kind == "landmark" else Chunk
        item = item_type.from_blob(blob, validate_session_id(session_id), validate_index(index))
        write = PendingWrite(kind=kind, session_id=session_id, index=index, blob=blob,
                             fingerprint_json=item.record.fingerprint.model_dump_json(), replace=replace)
        return self._submit(write)

    def flush(self) -> int:
        """Send the queued writes in order; return how many left the queue in this call.

        Stops at the first write that cannot reach Redis and keeps it and the rest queued. A
        queued write that conflicts with stored data is dropped with a warning, because a retry
        never overwrites what is stored.
        """
        flushed = 0
        while self._pending:
            write = self._pending[0]
            try:
                self._execute(write, replace=False)
            except UNREACHABLE_ERRORS as error:
                self._note_unreachable(error)
                return flushed
            except LandmarkMismatchError as error:
                logger.warning("dropped a queued write because Redis already contains different data: %s",
                               error)
            self._pending.popleft()
            self._pending_bytes -= len(write.blob)
            flushed += 1
            self._flushed_in_outage += 1
        self._note_reachable()
        return flushed

    def delete(self, session_id: str, index: int | None = None) -> int:
        """Delete landmark and chunk `index` of the session, or the whole session if index is None.

        The usage counters of what is deleted go too (see ctxmem.store.usage). Queued writes of what is deleted are dropped too. Returns the number of Redis keys removed.
        """
        session_id = validate_session_id(session_id)
        index = None if index is None else validate_index(index)
        self._drop_pending(session_id, index)
        keys = [self.keys.meta(session_id), self.keys.landmarks(session_id), self.keys.chunks(session_id),
                self.keys.usage(session_id)]
        args = [self.keys.item_prefix(session_id, "landmark"), self.keys.item_prefix(session_id, "chunk"),
                "" if index is None else str(index)]
        removed = self._read(lambda: self._delete_script(keys=keys, args=args))
        if index is None:
            self._read(lambda: self.client.zrem(self.keys.sessions(), session_id))
        logger.debug("deleted %d keys of session %r (index %s)", removed, session_id, index)
        return int(removed)

    # Reads

    def get(self, session_id: str, index: int, fingerprint: ModelFingerprint | None = None) -> Landmark:
        """Return landmark `index` of the session, verified against its record and checksum.

        With `fingerprint`, also raise LandmarkMismatchError if another model computed it.
        Raises LandmarkNotFoundError if nothing is stored there, ConnectionError if Redis is down.
        """
        blob = self._get_blob("landmark", session_id, index)
        landmark = Landmark.from_blob(blob, session_id, index)
        if fingerprint is not None:
            check_compatible(landmark.record, fingerprint)
        return landmark

    def get_chunk(self, session_id: str, index: int, fingerprint: ModelFingerprint | None = None) -> Chunk:
        """Return chunk `index` of the session; checks and errors as for `get`."""
        blob = self._get_blob("chunk", session_id, index)
        chunk = Chunk.from_blob(blob, session_id, index)
        if fingerprint is not None:
            check_compatible(chunk.record, fingerprint)
        return chunk

    def indices(self, session_id: str, start: int = 0) -> list[int]:
        """Return the indices of the session's stored landmarks from `start` on, ascending."""
        return self._indices(self.keys.landmarks(validate_session_id(session_id)), start)

    def chunk_indices(self, session_id: str, start: int = 0) -> list[int]:
        """Return the indices of the session's stored chunks from `start` on, ascending."""
        return self._indices(self.keys.chunks(validate_session_id(session_id)), start)

    def _indices(self, key: str, start: int) -> list[int]:
        members = self._read(lambda: self.client.zrangebyscore(key, start, "+inf"))  # scored by the index
        return [int(member) for member in members]

    def scan_sessions(self) -> list[str]:
        """Return the ids of all sessions under the prefix, sorted, found with SCAN over meta keys.

        Sessions whose keys expired are not listed, even while `{prefix}:sessions` still lists them.
        """
        def scan() -> list[str]:
            found = (self.keys.session_of_meta(key)
                     for key in self.client.scan_iter(match=self.keys.meta_pattern(), count=1000))
            return sorted({session_id for session_id in found if session_id is not None})

        return self._read(scan)

    # Internals

    def _pending_write(self, kind: Kind, item: Landmark | Chunk, replace: bool) -> PendingWrite:
        record = item.record
        return PendingWrite(kind=kind, session_id=record.session_id, index=record.index,
                            blob=item.to_blob(), fingerprint_json=record.fingerprint.model_dump_json(),
                            replace=replace)

    def _submit(self, write: PendingWrite) -> PutStatus:
        if self._pending:
            self.flush()
        if self._pending:
            self._enqueue(write)
            return "pending"
        try:
            status = self._execute(write, replace=write.replace)
        except UNREACHABLE_ERRORS as error:
            self._note_unreachable(error)
            self._enqueue(write)
            return "pending"
        self._note_reachable()
        return status

    def _execute(self, write: PendingWrite, replace: bool) -> PutStatus:
        """Run the put script for `write`; raise LandmarkMismatchError on a conflict."""
        session_id, index = write.session_id, write.index
        keys = self.keys
        status, detail = self._put_script(
            keys=[keys.item(session_id, write.kind, index), keys.item_index(session_id, write.kind),
                  keys.meta(session_id), keys.landmarks(session_id), keys.chunks(session_id)],
            args=[write.blob, index, write.fingerprint_json, utc_now().isoformat(), self.ttl_seconds or 0,
                  "1" if replace else "0", SCHEMA_VERSION, keys.item_prefix(session_id, "landmark"),
                  keys.item_prefix(session_id, "chunk")],
        )
        status = status.decode()
        if status == "fingerprint":
            raise self._fingerprint_conflict(write, detail)
        if status == "conflict":
            raise LandmarkMismatchError(
                session_id, index, f"a different {write.kind} is already stored under this index; "
                "pass replace=True to overwrite it, or delete it first", write.kind)

        # The sessions index lives outside the session's hash slot, so it cannot join the script.
        self.client.zadd(keys.sessions(), {session_id: time.time()})
        logger.debug("%s %s %d of session %r (%d bytes)", status, write.kind, index, session_id,
                     len(write.blob))
        return status

    def _fingerprint_conflict(self, write: PendingWrite, session_json: bytes) -> LandmarkMismatchError:
        differences = fingerprint_differences(ModelFingerprint.model_validate_json(session_json),
                                              ModelFingerprint.model_validate_json(write.fingerprint_json))
        return LandmarkMismatchError(
            write.session_id, write.index,
            f"the session contains data of another model ({'; '.join(differences)}); "
            "delete the session or store this one under a new session id", write.kind)

    def _enqueue(self, write: PendingWrite) -> None:
        self._pending.append(write)
        self._pending_bytes += len(write.blob)
        while len(self._pending) > self.max_pending or self._pending_bytes > self.max_pending_bytes:
            dropped = self._pending.popleft()
            self._pending_bytes -= len(dropped.blob)
            logger.warning(
                "Redis at %s is unreachable and the write queue is full (max_pending=%d, "
                "max_pending_bytes=%d): dropped the oldest queued write, %s %d of session %r",
                self.where, self.max_pending, self.max_pending_bytes, dropped.kind, dropped.index,
                dropped.session_id)

    def _drop_pending(self, session_id: str, index: int | None) -> None:
        remaining = deque(write for write in self._pending
                          if write.session_id != session_id or (index is not None and write.index != index))
        if len(remaining) != len(self._pending):
            logger.info("dropped %d queued writes of session %r because it was deleted",
                        len(self._pending) - len(remaining), session_id)
        self._pending = remaining
        self._pending_bytes = sum(len(write.blob) for write in remaining)

    def _note_unreachable(self, error: Exception) -> None:
        if self._unreachable:
            return
        self._unreachable = True
        self._flushed_in_outage = 0
        logger.warning("cannot reach Redis at %s (%s): queueing writes in memory (max_pending=%d) "
                       "and retrying them on the next put or flush()", self.where, error, self.max_pending)

    def _note_reachable(self) -> None:
        if not self._unreachable:
            return
        self._unreachable = False
        logger.info("Redis at %s is reachable again: flushed %d queued writes", self.where,
                    self._flushed_in_outage)

    def _get_blob(self, kind: Kind, session_id: str, index: int) -> bytes:
        session_id = validate_session_id(session_id)
        index = validate_index(index)
        key = self.keys.item(session_id, kind, index)
        blob = self._read(lambda: self.client.get(key))
        if blob is None:
            raise LandmarkNotFoundError(f"session {session_id!r} has no {kind} {index} under prefix "
                                        f"{self.keys.prefix!r}")
        return blob

    def _read(self, operation: Callable[[], T]) -> T:
        """Run `operation` after flushing queued writes; raise ConnectionError naming the server if down."""
        if self._pending:
            self.flush()
        try:
            return operation()
        except UNREACHABLE_ERRORS as error:
            raise ConnectionError(f"cannot reach Redis at {self.where}: {error}; start the server "
                                  "or check the URL") from error


def _check_type(name: str, value: object, expected: type) -> None:
    if not isinstance(value, expected):
        raise TypeError(f"{name} must be a {expected.__name__}, got {type(value).__name__}")


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_or_none(name: str, value: object) -> int | None:
    return None if value is None else _positive(name, value)
