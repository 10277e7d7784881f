"""The session store: each session's message records and state dict in Redis, one writer at a time.

A writer takes a lease on the session (`acquire`): a lock key set with NX and a PX expiry,
holding a token "<fence>:<uuid4 hex>", where the fence is a counter that every acquire
increments. `commit` runs as one Lua script over the keys of the session, which share a hash
slot. The script writes only if the lock still holds the writer's token and no commit with a
newer fence has happened. It then trims the message list (rollback), appends the new records,
replaces the state blob, updates the meta hash that the landmark store shares, and refreshes the
TTL of every key of the session. A writer whose lease expired, or was taken over, gets
SessionLockError and the script writes nothing.

Message records and the state are msgpack blobs made by `ctxmem.store.codec`, so tensors in the
state come back bit for bit. A round trip keeps dicts with str or int keys, lists, str, int
(64-bit), float, bool, None, bytes and tensors. Tuples come back as lists.

Unlike the landmark store, this store never queues writes during an outage, because a queued
commit would outlive its lease. Reads and writes raise ConnectionError naming the server.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import redis

from ctxmem.store.codec import decode, encode
from ctxmem.store.connection import client_for, describe
from ctxmem.store.keys import DEFAULT_PREFIX, KeySchema, validate_session_id
from ctxmem.store.landmarks import UNREACHABLE_ERRORS
from ctxmem.store.records import utc_now

logger = logging.getLogger(__name__)

T = TypeVar("T")

STATE_SCHEMA_VERSION = 1
# Base sleep between acquire attempts. Each sleep adds up to as much again at random, so that
# waiting writers do not poll in step.
POLL_SECONDS = 0.02

# KEYS: lock, fence, meta. ARGV: uuid4 hex, lock expiry (ms), TTL seconds (0: none).
# Returns {fence, token} when the lock was free and is now taken, else {0, holder's token, its PTTL}.
# The fence never falls to or below the fence of the last commit (meta field `fence`), even when
# the fence key expired or was deleted while the meta hash stayed.
ACQUIRE_SCRIPT = """
local lock, fence_key, meta = KEYS[1], KEYS[2], KEYS[3]
local holder = redis.call('GET', lock)
if holder then
  return {0, holder, redis.call('PTTL', lock)}
end

local fence = redis.call('INCR', fence_key)
local committed = tonumber(redis.call('HGET', meta, 'fence') or '0')
if fence <= committed then
  fence = committed + 1
  redis.call('SET', fence_key, fence)
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', fence_key, ttl)
end

local token = string.format('%d:%s', fence, ARGV[1])
redis.call('SET', lock, token, 'PX', ARGV[2])
return {fence, token}
"""

# KEYS: lock. ARGV: token, lock expiry (ms). Returns {1, ""} if renewed, else {0, holder's token or ""}.
RENEW_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, ''}
end
return {0, holder or ''}
"""

# KEYS: lock. ARGV: token. Deletes the lock only if it holds the token, and returns 1 if it did.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: lock, messages, state, meta, fence, landmarks index, chunks index.
# ARGV: token, fence, keep ("" for none), state blob, time (ISO 8601), TTL seconds (0: none),
#       landmark key without index, chunk key without index, then one blob per appended record.
# Returns {"ok", message count}, or before any write {"lock", holder's token or ""},
# {"stale", fence of the last commit} or {"keep", message count}.
# NOTE: the TTL loop builds landmark and chunk keys from ARGV. They share the session's hash
# slot, but Redis Cluster documents scripts that touch undeclared keys as unsupported.
COMMIT_SCRIPT = """
local lock, messages, state, meta, fence_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local first_record = 9

local holder = redis.call('GET', lock)
if holder ~= ARGV[1] then
  return {'lock', holder or ''}
end
local committed = tonumber(redis.call('HGET', meta, 'fence') or '0')
if committed > tonumber(ARGV[2]) then
  return {'stale', committed}
end

if ARGV[3] ~= '' then
  local keep = tonumber(ARGV[3])
  local count = redis.call('LLEN', messages)
  if keep > count then
    return {'keep', count}
  end
  if keep == 0 then
    redis.call('DEL', messages)
  elseif keep < count then
    redis.call('LTRIM', messages, 0, keep - 1)
  end
end

-- RPUSH in batches of 1000 records, because unpack() in Redis's Lua takes at most about 8000 values.
for first = first_record, #ARGV, 1000 do
  redis.call('RPUSH', messages, unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
redis.call('SET', state, ARGV[4], 'KEEPTTL')
redis.call('HSET', meta, 'updated', ARGV[5], 'fence', ARGV[2])
redis.call('HSETNX', meta, 'created', ARGV[5])

local ttl = tonumber(ARGV[6])
if ttl > 0 then
  for _, key in ipairs({messages, state, meta, fence_key}) do
    redis.call('EXPIRE', key, ttl)
  end
  for position, key_prefix in ipairs({ARGV[7], ARGV[8]}) do
    local index_set = KEYS[5 + position]
    for _, member in ipairs(redis.call('ZRANGE', index_set, 0, -1)) do
      redis.call('EXPIRE', key_prefix .. member, ttl)
    end
    redis.call('EXPIRE', index_set, ttl)
  end
end
return {'ok', redis.call('LLEN', messages)}
"""

# KEYS: messages, state, lock, fence, meta, landmarks index, chunks index.
# Removes the session store's keys and the meta field `fence`. The meta hash itself goes too
# when the session has no landmarks and no chunks. Returns {keys removed, 1 if meta was removed}.
DELETE_SCRIPT = """
local removed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[5], 'fence')
if redis.call('EXISTS', KEYS[6], KEYS[7]) == 0 then
  return {removed + redis.call('DEL', KEYS[5]), 1}
end
return {removed, 0}
"""


class SessionLockError(RuntimeError):
    """A session's lock could not be taken, or a lease was lost before a renew or commit."""

    def __init__(self, session_id: str, message: str):
        super().__init__(f"session {session_id!r}: {message}")
        self.session_id = session_id


class SessionBusyError(SessionLockError):
    """Another writer held a session's lock for longer than the turn was willing to wait."""


class SessionDataError(ValueError):
    """A stored message record or state blob cannot be decoded or has an unknown schema version."""


@dataclass(frozen=True)
class Lease:
    """The right to commit to one session, from `acquire` until release or expiry.

    `token` is f"{fence}:{uuid4 hex}", the value of the lock key while the lease holds. `fence`
    increases with every acquire of the session, so a commit can tell an older writer from a
    newer one.
    """

    session_id: str
    token: str
    fence: int


class SessionStore:
    """Message records and state of many sessions in one Redis database, with one writer per session.

    Parameters:
        client_or_url: a `redis.Redis` client created with decode_responses=False, a
            redis://, rediss:// or unix:// URL, or None for $CTXMEM_REDIS_URL or else the
            embedded server (see `ctxmem.store.connection.connect`).
        prefix: the first part of every key; see `ctxmem.store.keys`.
        ttl_seconds: when set, every commit gives every key of its session this time to live,
            landmarks and chunks included, but not the lock, which has its own expiry. Without
            it, a commit leaves existing TTLs as they are.
        lock_timeout: seconds a lease lasts after `acquire` or `renew`. A writer that needs
            longer between commits calls `renew`.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str | None = None,
        prefix: str = DEFAULT_PREFIX,
        ttl_seconds: int | None = None,
        lock_timeout: float = 30.0,
    ):
        self.keys = KeySchema(prefix)
        self.ttl_seconds = _positive_int_or_none("ttl_seconds", ttl_seconds)
        self.lock_timeout = _seconds("lock_timeout", lock_timeout, allow_zero=False)
        self.lock_ms = max(1, round(self.lock_timeout * 1000))
        self.client = client_for(client_or_url)
        self.where = describe(self.client)  # host, port and db, never the password
        self._acquire_script = self.client.register_script(ACQUIRE_SCRIPT)
        self._renew_script = self.client.register_script(RENEW_SCRIPT)
        self._release_script = self.client.register_script(RELEASE_SCRIPT)
        self._commit_script = self.client.register_script(COMMIT_SCRIPT)
        self._delete_script = self.client.register_script(DELETE_SCRIPT)

    # Leases

    def acquire(self, session_id: str, wait: float = 10.0) -> Lease:
        """Take the session's lock and return the lease, retrying for up to `wait` seconds.

        Raises SessionLockError naming the session when another writer still holds the lock
        after `wait` seconds (wait=0 tries once).
        """
        session_id = validate_session_id(session_id)
        wait = _seconds("wait", wait, allow_zero=True)
        keys = [self.keys.lock(session_id), self.keys.fence(session_id), self.keys.meta(session_id)]
        args = [uuid.uuid4().hex, self.lock_ms, self.ttl_seconds or 0]
        deadline = time.monotonic() + wait

        while True:
            fence, token, *expiry = self._call(lambda: self._acquire_script(keys=keys, args=args),
                                               f"lock session {session_id!r}")
            if fence:
                logger.debug("acquired session %r with fence %d", session_id, fence)
                return Lease(session_id=session_id, token=token.decode(), fence=int(fence))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionBusyError(session_id, f"timed out after {wait:g} s waiting for the lock: "
                                       f"held by another writer ({_describe_holder(token, expiry[0])}); "
                                       "retry later or pass a longer wait")
            time.sleep(min(remaining, POLL_SECONDS * (1 + random.random())))

    def renew(self, lease: Lease) -> None:
        """Extend the lease by `lock_timeout` seconds from now.

        Raises SessionLockError if the lock expired or another writer holds it, because then
        the lease cannot be recovered: acquire a new one and reload the session.
        """
        _check_lease(lease)
        renewed, holder = self._call(
            lambda: self._renew_script(keys=[self.keys.lock(lease.session_id)], args=[lease.token, self.lock_ms]),
            f"renew the lease of session {lease.session_id!r}")
        if not renewed:
            raise SessionLockError(lease.session_id, f"cannot renew the lease with fence {lease.fence}: "
                                   f"{_lost_reason(holder)}; acquire a new lease and reload the session")

    def release(self, lease: Lease) -> None:
        """Delete the session's lock if it still holds this lease's token.

        A lease that already expired or was taken over is not an error, but it is logged,
        because the writer ran longer than `lock_timeout` without `renew`.
        """
        _check_lease(lease)
        released = self._call(
            lambda: self._release_script(keys=[self.keys.lock(lease.session_id)], args=[lease.token]),
            f"release the lease of session {lease.session_id!r}")
        if released:
            logger.debug("released session %r (fence %d)", lease.session_id, lease.fence)
        else:
            logger.warning("the lease of session %r with fence %d had already expired or been taken "
                           "by another writer when it was released; raise lock_timeout (%g s) or call "
                           "renew() more often", lease.session_id, lease.fence, self.lock_timeout)

    @contextmanager
    def lease(self, session_id: str, wait: float = 10.0) -> Iterator[Lease]:
        """Acquire the session's lease for the `with` block and release it afterwards, also on error."""
        acquired = self.acquire(session_id, wait)
        try:
            yield acquired
        finally:
            self.release(acquired)

    # Writes

    def commit(self, lease: Lease, state: dict, append: Iterable[dict] = (), keep: int | None = None) -> int:
        """Write the session's new state and message records atomically; return the message count.

        With `keep`, the message list is first cut to its first `keep` records (a rollback),
        then `append` is added at the end. Raises SessionLockError, and writes nothing, when
        the lease expired, another writer holds the lock, or a writer with a newer fence has
        committed. Raises ValueError, and writes nothing, when `keep` exceeds the message count.
        """
        _check_lease(lease)
        keep = _check_keep(keep)
        session_id = lease.session_id
        state_blob = self._encode_state(session_id, lease.fence, state)
        record_blobs = self._encode_records(session_id, append)

        keys = self.keys
        status, detail = self._call(
            lambda: self._commit_script(
                keys=[keys.lock(session_id), keys.messages(session_id), keys.state(session_id),
                      keys.meta(session_id), keys.fence(session_id), keys.landmarks(session_id),
                      keys.chunks(session_id)],
                args=[lease.token, lease.fence, "" if keep is None else keep, state_blob,
                      utc_now().isoformat(), self.ttl_seconds or 0, keys.item_prefix(session_id, "landmark"),
                      keys.item_prefix(session_id, "chunk"), *record_blobs]),
            f"commit to session {session_id!r}", outcome_unknown=True)
        self._raise_for_status(lease, status.decode(), detail, keep)

        # The sessions index lives outside the session's hash slot, so it cannot join the script.
        self._call(lambda: self.client.zadd(keys.sessions(), {session_id: time.time()}),
                   f"list session {session_id!r} in {keys.sessions()}")
        logger.debug("committed session %r with fence %d: kept %s, appended %d, %d messages", session_id,
                     lease.fence, "all" if keep is None else keep, len(record_blobs), detail)
        return int(detail)

    def delete(self, session_id: str) -> int:
        """Delete the session's messages, state, lock and fence; return the number of keys removed.

        Landmarks and chunks stay, for `LandmarkStore.delete`. The meta hash and the entry in
        `{prefix}:sessions` go too when the session has no landmarks and no chunks, so the two
        deletes remove everything in either order. A writer that still holds a lease gets
        SessionLockError on its next commit.
        """
        session_id = validate_session_id(session_id)
        keys = self.keys
        removed, meta_removed = self._call(
            lambda: self._delete_script(
                keys=[keys.messages(session_id), keys.state(session_id), keys.lock(session_id),
                      keys.fence(session_id), keys.meta(session_id), keys.landmarks(session_id),
                      keys.chunks(session_id)]),
            f"delete session {session_id!r}")
        if meta_removed:
            self._call(lambda: self.client.zrem(keys.sessions(), session_id),
                       f"remove session {session_id!r} from {keys.sessions()}")
        logger.debug("deleted %d keys of session %r", removed, session_id)
        return int(removed)

    # Reads

    def messages(self, session_id: str, start: int = 0, end: int = -1) -> list[dict]:
        """Return message records `start` to `end`, both included; negative positions count from the end (LRANGE)."""
        session_id = validate_session_id(session_id)
        start, end = _int("start", start), _int("end", end)
        key = self.keys.messages(session_id)
        blobs = self._call(lambda: self.client.lrange(key, start, end), f"read messages of session {session_id!r}")
        return [self._decode_record(session_id, blob, start, offset) for offset, blob in enumerate(blobs)]

    def message_count(self, session_id: str) -> int:
        """Return the number of message records stored for the session (0 if none)."""
        key = self.keys.messages(validate_session_id(session_id))
        return int(self._call(lambda: self.client.llen(key), f"count messages of session {session_id!r}"))

    def load_state(self, session_id: str) -> dict | None:
        """Return the state dict of the last commit, or None if the session has none.

        Raises SessionDataError when the blob cannot be decoded or has an unknown schema version.
        """
        key = self.keys.state(validate_session_id(session_id))
        blob = self._call(lambda: self.client.get(key), f"read the state of session {session_id!r}")
        return None if blob is None else self._decode_state(session_id, blob)

    def snapshot(self, session_id: str) -> tuple[dict | None, list[dict]]:
        """Return the state and all message records of one commit, read in a single transaction.

        Separate `load_state` and `messages` calls may see two different commits when a writer
        commits between them.
        """
        session_id = validate_session_id(session_id)

        def read() -> list:
            pipeline = self.client.pipeline(transaction=True)
            pipeline.get(self.keys.state(session_id))
            pipeline.lrange(self.keys.messages(session_id), 0, -1)
            return pipeline.execute()

        state_blob, blobs = self._call(read, f"read session {session_id!r}")
        state = None if state_blob is None else self._decode_state(session_id, state_blob)
        return state, [self._decode_record(session_id, blob, 0, offset) for offset, blob in enumerate(blobs)]

    def exists(self, session_id: str) -> bool:
        """Return whether the session has a committed state or message records."""
        session_id = validate_session_id(session_id)
        keys = [self.keys.state(session_id), self.keys.messages(session_id)]
        return bool(self._call(lambda: self.client.exists(*keys), f"look up session {session_id!r}"))

    # Internals

    def _call(self, operation: Callable[[], T], action: str, outcome_unknown: bool = False) -> T:
        """Run `operation`; raise ConnectionError naming the server and `action` if Redis is unreachable."""
        try:
            return operation()
        except UNREACHABLE_ERRORS as error:
            consequence = ("; the commit may or may not have been applied, so check message_count() "
                           "before retrying" if outcome_unknown else "")
            raise ConnectionError(f"cannot reach Redis at {self.where} to {action}: {error}{consequence}; "
                                  "start the server or check the URL") from error

    def _raise_for_status(self, lease: Lease, status: str, detail: Any, keep: int | None) -> None:
        """Turn a rejected commit's status from the script into SessionLockError or ValueError."""
        if status == "ok":
            return
        if status == "lock":
            raise SessionLockError(lease.session_id, f"commit rejected, nothing written: the lease with "
                                   f"fence {lease.fence} was lost ({_lost_reason(detail)}); acquire a new "
                                   "lease and reload the session")
        if status == "stale":
            raise SessionLockError(lease.session_id, f"commit rejected, nothing written: stale writer, the "
                                   f"lease has fence {lease.fence} but a writer with fence {detail} has "
                                   "already committed; acquire a new lease and reload the session")
        if status == "keep":
            raise ValueError(f"invalid keep={keep} for session {lease.session_id!r}, which has {detail} "
                             f"messages: pass keep between 0 and {detail}; nothing was written")
        raise RuntimeError(f"unexpected status {status!r} from the commit script of session {lease.session_id!r}")

    def _encode_state(self, session_id: str, fence: int, state: dict) -> bytes:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        try:
            return encode({"schema_version": STATE_SCHEMA_VERSION, "fence": fence, "state": state})
        except (TypeError, ValueError, OverflowError) as error:
            raise TypeError(f"cannot encode the state of session {session_id!r}: {error}") from error

    def _encode_records(self, session_id: str, append: Iterable[dict]) -> list[bytes]:
        if isinstance(append, (dict, str, bytes)):
            raise TypeError(f"append must be a list of message dicts, got a {type(append).__name__}; "
                            "wrap a single record in a list: append=[record]")
        blobs = []
        for position, record in enumerate(append):
            if not isinstance(record, dict):
                raise TypeError(f"message record {position} of append must be a dict, "
                                f"got {type(record).__name__}: {str(record)[:80]}")
            try:
                blobs.append(encode(record))
            except (TypeError, ValueError, OverflowError) as error:
                raise TypeError(f"cannot encode message record {position} for session {session_id!r}: "
                                f"{error}") from error
        return blobs

    def _decode_state(self, session_id: str, blob: bytes) -> dict:
        """Return the state dict inside a state blob after checking its schema version."""
        try:
            wrapper = decode(blob)
        except ValueError as error:
            raise SessionDataError(f"cannot decode the state of session {session_id!r}: {error}") from error
        if not isinstance(wrapper, dict) or not isinstance(wrapper.get("state"), dict):
            raise SessionDataError(f"invalid state blob of session {session_id!r}: expected a dict with "
                                   f"schema_version and state, got {str(wrapper)[:80]}")
        version = wrapper.get("schema_version")
        if version != STATE_SCHEMA_VERSION:
            raise SessionDataError(f"the state of session {session_id!r} has schema version {version!r}, "
                                   f"but this ctxmem reads version {STATE_SCHEMA_VERSION} only; use the ctxmem "
                                   "version that wrote it, or delete the session")
        return wrapper["state"]

    def _decode_record(self, session_id: str, blob: bytes, start: int, offset: int) -> dict:
        where = f"message {start + offset}" if start >= 0 else f"message {offset} of the range from {start}"
        try:
            record = decode(blob)
        except ValueError as error:
            raise SessionDataError(f"cannot decode {where} of session {session_id!r}: {error}") from error
        if not isinstance(record, dict):
            raise SessionDataError(f"invalid {where} of session {session_id!r}: expected a dict, "
                                   f"got {type(record).__name__}")
        return record


def _describe_holder(token: bytes, pttl: int) -> str:
    fence = token.decode(errors="replace").split(":", 1)[0]
    expiry = f"expires in {pttl} ms" if pttl >= 0 else "no expiry"
    return f"lease fence {fence}, {expiry}"


def _lost_reason(holder: bytes) -> str:
    if not holder:
        return "the lock expired or was released"
    fence = holder.decode(errors="replace").split(":", 1)[0]
    return f"the lock is held by another writer with fence {fence}"


def _check_lease(lease: object) -> None:
    if not isinstance(lease, Lease):
        raise TypeError(f"lease must be a Lease from SessionStore.acquire, got {type(lease).__name__}")
    validate_session_id(lease.session_id)


def _check_keep(keep: object) -> int | None:
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int or None, got {type(keep).__name__}")
    if keep < 0:
        raise ValueError(f"invalid keep={keep}: pass the number of messages to keep, 0 or more, "
                         "or None to keep them all")
    return keep


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _seconds(name: str, value: object, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        raise ValueError(f"invalid {name}={value!r}: pass {bound} seconds")
    return float(value)


def _positive_int_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value
