"""Redis key names of the landmark and session stores, all built by `KeySchema`, and checks of their parts.

Schema, for a prefix (default "ctxmem") and a session id:

    {prefix}:{<session>}:meta           hash: schema_version, fingerprint (JSON), created, updated
    {prefix}:{<session>}:landmarks      sorted set: landmark index -> score = index
    {prefix}:{<session>}:landmark:<i>   msgpack: record JSON, keys and values [layers, kv_heads, k, head_dim]
    {prefix}:{<session>}:chunks         sorted set: chunk index -> score = index
    {prefix}:{<session>}:chunk:<i>      msgpack: record JSON, keys and values [layers, kv_heads, chunk_len,
                                        head_dim], token ids [chunk_len] or nil
    {prefix}:{<session>}:messages       list: one msgpack blob per message record, in order
    {prefix}:{<session>}:state          msgpack: {"schema_version", "fence", "state"}
    {prefix}:{<session>}:lock           string: lease token "<fence>:<uuid4 hex>" of the writer, with a PX expiry
    {prefix}:{<session>}:fence          integer: fencing token, incremented by every lock acquire
    {prefix}:{<session>}:usage          hash: "<i>:injected" and "<i>:mass" per landmark, written only
                                        when attention statistics are on (see ctxmem.store.usage)
    {prefix}:sessions                   sorted set: session id -> last update (Unix seconds)

The meta hash and `{prefix}:sessions` are shared: the landmark store and the session store
both update them. The session store also keeps `fence` in the meta hash, the fence of the last
commit.

The session id sits inside braces, a Redis Cluster hash tag, so all keys of one session hash to
the same slot and one script or transaction may touch them together. Session ids and prefixes
are restricted to characters that are neither glob patterns nor hash-tag braces, so the SCAN
patterns built here match exactly the keys they name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "ctxmem"
SESSION_ID_RULE = "1 to 128 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
PREFIX_RULE = "1 to 128 characters from A-Z, a-z, 0-9, '.', '_', '-', ':' and '/'"
_SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_PREFIX = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def validate_session_id(session_id: object) -> str:
    """Return `session_id` if it is a valid session id, else raise TypeError or ValueError."""
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a str, got {type(session_id).__name__}")
    if not _SESSION_ID.fullmatch(session_id):
        truncated = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        raise ValueError(f"invalid session id {truncated!r} ({len(session_id)} characters): "
                         f"use {SESSION_ID_RULE}")
    return session_id


def validate_prefix(prefix: object) -> str:
    """Return `prefix` if it is a valid key prefix, else raise TypeError or ValueError."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"invalid key prefix {prefix!r}: use {PREFIX_RULE} "
                         "(no braces, spaces or glob characters), for example 'ctxmem'")
    return prefix


def validate_index(index: object) -> int:
    """Return `index` if it is a non-negative int (not a bool), else raise TypeError or ValueError."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if index < 0:
        raise ValueError(f"invalid index {index}: landmark and chunk indices start at 0")
    return index


@dataclass(frozen=True)
class KeySchema:
    """Builds every Redis key of the store for one validated `prefix`."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    def session_base(self, session_id: str) -> str:
        """Return the part that starts every key of the session: `{prefix}:{<session>}:`."""
        return f"{self.prefix}:{{{session_id}}}:"

    def meta(self, session_id: str) -> str:
        return self.session_base(session_id) + "meta"

    def landmarks(self, session_id: str) -> str:
        return self.session_base(session_id) + "landmarks"

    def landmark(self, session_id: str, index: int) -> str:
        return self.item(session_id, "landmark", index)

    def chunks(self, session_id: str) -> str:
        return self.session_base(session_id) + "chunks"

    def chunk(self, session_id: str, index: int) -> str:
        return self.item(session_id, "chunk", index)

    def item(self, session_id: str, kind: str, index: int) -> str:
        """Return the key of landmark or chunk `index`, `kind` being "landmark" or "chunk"."""
        return self.item_prefix(session_id, kind) + str(index)

    def item_prefix(self, session_id: str, kind: str) -> str:
        """Return the key of a landmark or chunk without its index: `{prefix}:{<session>}:<kind>:`."""
        return self.session_base(session_id) + f"{kind}:"

    def item_index(self, session_id: str, kind: str) -> str:
        """Return the sorted set that lists the session's landmarks or chunks."""
        return self.session_base(session_id) + f"{kind}s"

    def messages(self, session_id: str) -> str:
        return self.session_base(session_id) + "messages"

    def state(self, session_id: str) -> str:
        return self.session_base(session_id) + "state"

    def lock(self, session_id: str) -> str:
        return self.session_base(session_id) + "lock"

    def fence(self, session_id: str) -> str:
        return self.session_base(session_id) + "fence"

    def usage(self, session_id: str) -> str:
        return self.session_base(session_id) + "usage"

    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    def meta_pattern(self) -> str:
        """Return the SCAN pattern that matches the meta key of every session under the prefix."""
        return f"{self.prefix}:{{*}}:meta"

    def session_of_meta(self, key: bytes | str) -> str | None:
        """Return the session id in a meta key, or None if `key` is not a meta key of this prefix."""
        text = key.decode() if isinstance(key, bytes) else key
        start, end = f"{self.prefix}:{{", "}:meta"
        if not (text.startswith(start) and text.endswith(end)):
            return None
        session_id = text[len(start):-len(end)]
        return session_id if _SESSION_ID.fullmatch(session_id) else None
