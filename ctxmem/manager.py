"""The memory manager: sessions by id over one model, at most `max_sessions` held on the device.

Every session lives in Redis (see ctxmem.session), so the manager may drop a session's device
tensors at any time. The least recently used one goes when a new one would exceed the limit,
and it is loaded back from Redis on its next turn. Any process or worker with the same Redis
and model can serve any session.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import redis
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.session import Session, SessionSettings
from ctxmem.store.connection import client_for
from ctxmem.store.keys import DEFAULT_PREFIX, validate_session_id
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.sessions import SessionStore

logger = logging.getLogger(__name__)


class MemoryManager:
    """Hands out `Session`s by id; new sessions get `settings`, resumed ones keep their own.

    `redis_url` None uses $CTXMEM_REDIS_URL, else the embedded server. `lock_timeout` is how
    long a turn may hold a session's lock before another writer may take it, and `lock_wait`
    how long a turn waits for a lock another writer holds.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 redis_url: str | redis.Redis | None = None, prefix: str = DEFAULT_PREFIX,
                 settings: SessionSettings | None = None, max_sessions: int = 8,
                 ttl_seconds: int | None = None, lock_timeout: float = 30.0, lock_wait: float = 30.0):
        if max_sessions < 1:
            raise ValueError(f"invalid max_sessions {max_sessions}; hold at least 1 session in memory")
        client = client_for(redis_url)
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.max_sessions, self.lock_wait = max_sessions, lock_wait
        self.session_store = SessionStore(client, prefix=prefix, ttl_seconds=ttl_seconds, lock_timeout=lock_timeout)
        self.landmark_store = LandmarkStore(client, prefix=prefix, ttl_seconds=ttl_seconds)
        self._held: OrderedDict[str, Session] = OrderedDict()

    def session(self, session_id: str) -> Session:
        """Return the session `session_id`, new or stored; it loads from Redis on its first turn."""
        session_id = validate_session_id(session_id)
        session = self._held.pop(session_id, None)
        if session is None:
            self._reject_landmarks_without_conversation(session_id)
            session = Session(self.model, self.tokenizer, session_id, self.session_store, self.landmark_store,
                              self.settings if not self.session_store.exists(session_id) else None,
                              lock_wait=self.lock_wait)
            session.load()
        self._held[session_id] = session
        while len(self._held) > self.max_sessions:
            idle_id, idle = self._held.popitem(last=False)
            idle.release_device()
            logger.info("released session %r from memory (limit %d)", idle_id, self.max_sessions)
        return session

    def _reject_landmarks_without_conversation(self, session_id: str) -> None:
        """Raise ValueError for an id whose landmarks `ctxmem run` wrote, rather than delete them.

        NOTE: a conversation whose first turn crashed after storing landmarks looks the same;
        delete it with `MemoryManager.delete` to start over.
        """
        if self.session_store.exists(session_id):
            return
        if self.landmark_store.indices(session_id) or self.landmark_store.chunk_indices(session_id):
            raise ValueError(f"session {session_id!r} contains landmarks but no conversation (written by `ctxmem run`, "
                             "or by a first turn that failed); use another session id, or delete it first")

    def held(self) -> list[str]:
        """Return the ids of the sessions held in memory, least recently used first."""
        return list(self._held)

    def exists(self, session_id: str) -> bool:
        return self.session_store.exists(validate_session_id(session_id))

    def delete(self, session_id: str) -> None:
        """Delete everything stored for the session: log, state, landmarks and chunks."""
        session_id = validate_session_id(session_id)
        self._held.pop(session_id, None)
        self.landmark_store.delete(session_id)
        self.session_store.delete(session_id)
