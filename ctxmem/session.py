"""One durable conversation: delta feeding, generation, and resume from Redis in any process.

A `Session` owns a `Stream` and keeps in Redis everything needed to rebuild it. That is the
message log with the tokens each message added, a snapshot of the stream after every turn,
its landmarks and, in `exact` mode, the KV of every chunk. Each turn runs under the session's
lease (a Redis lock with a fencing token): it reloads the session if another writer committed
since, encodes only the messages it has not seen, generates, and commits atomically.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.fingerprint import model_fingerprint
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.rope import rotary_spec
from ctxmem.snapshot import capture, restore
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.records import Chunk, LandmarkMismatchError, ModelFingerprint, fingerprint_differences
from ctxmem.store.sessions import Lease, SessionStore
from ctxmem.stream import Stream
from ctxmem.toolcalls import ToolChoice
from ctxmem.transcript import Message, Renderer, common_prefix, hash_chain, parse_messages

logger = logging.getLogger(__name__)


class SessionSettings(BaseModel):
    """The settings of a session's context, fixed when the session is created.

    `resume` "exact" stores every chunk's KV as it is created and reloads it, so a resumed
    session computes what an uninterrupted one would; "recompute" keeps token ids only and
    encodes the window again on resume (cheaper; the window then no longer sees context that
    had already been evicted).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: CacheConfig = CacheConfig()
    landmarks: LandmarkConfig | None = None
    resume: Literal["exact", "recompute"] = "exact"


@dataclass
class Usage:
    """Token accounting of one turn: `cached_tokens` of the prompt were served from memory."""

    prompt_tokens: int
    encoded_tokens: int
    cached_tokens: int
    completion_tokens: int = 0
    rolled_back: bool = False


@dataclass
class Reply:
    """A generated reply: the message as logged (tool calls parsed), its tokens and its raw text."""

    message: Message
    token_ids: list[int]
    usage: Usage
    finish_reason: Literal["stop", "length", "tool_calls"]
    text: str = ""  # the raw generated text, tool-call markup included
    invalid_tool_calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments": str, "error"}


class Session:
    """A conversation under `session_id`, persisted in `sessions` (state, log) and `landmarks` (KV)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, session_id: str,
                 sessions: SessionStore, landmarks: LandmarkStore, settings: SessionSettings | None = None,
                 lock_wait: float = 30.0):
        self.model, self.tokenizer, self.session_id = model, tokenizer, session_id
        self.sessions, self.landmark_store = sessions, landmarks
        self.requested = settings
        self.settings = settings or SessionSettings()
        self.fingerprint = model_fingerprint(model)
        self.records: list[dict] = []  # {"message": dict, "hash": str, "ids": [int]} per message
        self.version = 0
        self.history: list[dict] = []
        self.lease: Lease | None = None
        self._rolled_back_to: int | None = None  # the log length a rollback keeps, until the commit
        self.lock_wait = lock_wait  # seconds a turn waits for another writer's lock
        self.stream = self._new_stream()

    # Building and loading

    def _new_stream(self) -> Stream:
        settings, memory = self.settings, None
        if settings.landmarks is not None:
            memory = LandmarkMemory(self.model, rotary_spec(self.model), settings.landmarks,
                                    settings.cache.landmark_slots, store=self.landmark_store,
                                    session_id=self.session_id, decode=self.tokenizer.decode)
            memory.store_chunks = settings.resume != "exact"
        stream = Stream(self.model, settings.cache, memory=memory)
        if settings.resume == "exact":
            stream.on_chunk = self._store_chunk
        return stream

    def _store_chunk(self, index: int, ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one completed window chunk's KV (keys without RoPE), once, as it is created."""
        start = len(self.stream.pinned_ids) + index * self.settings.cache.chunk
        self.landmark_store.put_chunk(Chunk.from_tensors(
            session_id=self.session_id, index=index, token_start=start, fingerprint=self.fingerprint,
            keys=keys.cpu(), values=values.cpu(), token_ids=torch.tensor(ids, dtype=torch.int64)))

    def load(self) -> bool:
        """Load the session's last committed state from Redis; return False if it has none.

        State and message log are read in one transaction, so they come from the same commit
        even without the lease.
        """
        state, records = self.sessions.snapshot(self.session_id)
        if state is None:
            return False
        self._load_state(state, records)
        return True

    def _load_state(self, state: dict, records: list[dict]) -> None:
        """Rebuild the stream, landmarks and log from one commit's `state` and message `records`."""
        self._check_compatible(state)
        self.settings = SessionSettings.model_validate(state["settings"])
        self.stream = self._new_stream()
        self._load_memory(state["landmarks"])
        load_chunk = self._load_chunk if self.settings.resume == "exact" else None
        restore(self.stream, state["stream"], load_chunk)
        self.records = records
        self.version, self.history = state["version"], list(state["history"])
        logger.info("session %r resumed (%s) at version %d: %d messages, %d tokens seen", self.session_id,
                    self.settings.resume, self.version, len(self.records), self.stream.tokens_seen)

    def _check_compatible(self, state: dict) -> None:
        stored = ModelFingerprint.model_validate(state["fingerprint"])
        differences = fingerprint_differences(stored, self.fingerprint)
        if differences:
            raise LandmarkMismatchError(f"session {self.session_id!r} was written by another model "
                                        f"({'; '.join(differences)}); open it with the model that created it")
        # Compared as settings, not dumps, so that a field added later with its default still matches.
        if self.requested is not None and self.requested != SessionSettings.model_validate(state["settings"]):
            raise ValueError(f"session {self.session_id!r} was created with settings {state['settings']}, "
                             f"not {self.requested.model_dump()}; open it without settings to use the stored ones")

    def _load_memory(self, count: int) -> None:
        memory = self.stream.memory
        if memory is None:
            return
        memory.landmarks = [self.landmark_store.get(self.session_id, index, self.fingerprint) for index in range(count)]
        if memory.config.policy == "retrieve":
            memory.chunks = [self._load_chunk(index) for index in range(count)]

    def _load_chunk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.landmark_store.get_chunk(self.session_id, index, self.fingerprint)
        return chunk.keys, chunk.values

    # Turns

    @contextmanager
    def turn(self, wait: float | None = None) -> Iterator[list[dict]]:
        """Hold the session's lease for one turn; reload first if another writer committed since.

        Yields the list that collects the turn's new message records; they are committed with
        the stream's snapshot when the block ends without an error.
        """
        with self.sessions.lease(self.session_id, wait=self.lock_wait if wait is None else wait) as lease:
            self.lease = lease
            try:
                stored = self.sessions.load_state(self.session_id)
                if stored is not None and stored["version"] != self.version:
                    # The lease keeps other writers out, so the log read now matches this state.
                    self._load_state(stored, self.sessions.messages(self.session_id))
                self._drop_uncommitted(stored)
                appended: list[dict] = []
                yield appended
                self._commit(lease, appended)
            except BaseException:
                self._forget()  # the stream and log may hold an uncommitted half turn
                raise
            finally:
                self.lease = None

    def _drop_uncommitted(self, state: dict | None) -> None:
        """Delete landmarks and chunks a writer stored after the last commit, then crashed or lost its lock.

        They would otherwise block this turn from storing its own landmarks and chunks under the
        same indices.
        """
        landmarks = state["landmarks"] if state else 0
        chunks = state["stream"]["chunks_emitted"] if state and self.settings.resume == "exact" else landmarks
        store = self.landmark_store
        extra = set(store.indices(self.session_id, landmarks)) | set(store.chunk_indices(self.session_id, chunks))
        for index in sorted(extra):
            store.delete(self.session_id, index)
        if extra:
            logger.warning("session %r: deleted %d landmark or chunk indices stored after its last commit",
                           self.session_id, len(extra))

    def _commit(self, lease: Lease, appended: list[dict]) -> None:
        if self.settings.resume == "exact":
            self.stream.emit_chunks()
        memory = self.stream.memory
        if memory is not None and memory.store is not None:
            memory.store.flush()
            memory.flush_usage()
        saturation = self.stream.saturation()
        self.history.append({"turn": len(self.history), "time": time.time(), **saturation.model_dump()})
        self.version += 1
        state = {
            "version": self.version, "settings": self.settings.model_dump(),
            "fingerprint": self.fingerprint.model_dump(mode="json"), "history": self.history,
            "landmarks": len(memory.landmarks) if memory else 0,
            "stream": capture(self.stream, exact=self.settings.resume == "exact"),
        }
        keep = self._rolled_back_to
        self.sessions.commit(lease, state, append=appended, keep=keep)
        self._rolled_back_to = None

    def _sync(self, messages: list[Message], tools: list[dict] | None, appended: list[dict]) -> tuple[list[int], Usage]:
        """Bring the stream up to `messages`; return the tokens still to feed and the usage so far."""
        chain = hash_chain(messages, tools)
        common = common_prefix([record["hash"] for record in self.records], chain)
        rolled_back = common < len(self.records)
        if rolled_back:
            self._rebuild(common)
        renderer = Renderer(self.tokenizer, tools)
        pending: list[int] = []
        for position, ids in enumerate(renderer.deltas(messages, common), start=common):
            record = {"message": messages[position].as_dict(), "hash": chain[position], "ids": ids}
            self.records.append(record)
            appended.append(record)
            pending += self._pin_if_system(position, ids)
        kept = sum(len(record["ids"]) for record in self.records[:common])
        replayed = kept if rolled_back else 0  # a rollback encodes the kept messages again
        usage = Usage(prompt_tokens=kept + len(pending), encoded_tokens=replayed + len(pending),
                      cached_tokens=kept - replayed, rolled_back=rolled_back)
        return pending, usage

    def _pin_if_system(self, position: int, ids: list[int]) -> list[int]:
        """Pin the system message when sinks="system" and the stream is new; return what is left to feed."""
        if position == 0 and self.stream.cache is None and self.records[0]["message"]["role"] == "system":
            self.stream.pin(ids)
            return []
        if self.stream.cache is None:
            raise ValueError(f"session {self.session_id!r} pins its system message (sinks='system'), but the "
                             "conversation does not start with one; add a system message or use sinks=4")
        return ids

    def _rebuild(self, keep: int) -> None:
        """Roll back to the first `keep` messages: rebuild the stream from their stored tokens."""
        logger.info("session %r: the history differs from message %d on; rebuilding from the stored transcript",
                    self.session_id, keep)
        for index in sorted(set(self.landmark_store.indices(self.session_id))
                            | set(self.landmark_store.chunk_indices(self.session_id))):
            self.landmark_store.delete(self.session_id, index)
        self.records = self.records[:keep]
        self.stream = self._new_stream()
        ids = [token for record in self.records for token in record["ids"]]
        if self.records and self.stream.cache is None:
            self.stream.pin(self.records[0]["ids"])
            ids = ids[len(self.records[0]["ids"]):]
        if ids:
            self.stream.feed(ids)
        self._rolled_back_to = keep

    def feed(self, messages: list, tools: list[dict] | None = None) -> Usage:
        """Encode the messages the session has not seen yet, without replying, and commit."""
        parsed = parse_messages(messages)
        with self.turn() as appended:
            pending, usage = self._sync(parsed, tools, appended)
            if pending:
                self.stream.feed(pending)
        return usage

    def append(self, messages: list, tools: list[dict] | None = None) -> Usage:
        """Encode `messages` after the session's stored log, without replying, and commit.

        Unlike `feed`, which takes the whole conversation, this suits several writers adding to
        one session, because each turn appends to the log as it is when the turn gets the lock.
        """
        parsed = parse_messages(messages)
        with self.turn() as appended:
            history = [Message.model_validate(record["message"]) for record in self.records]
            pending, usage = self._sync(history + parsed, tools, appended)
            if pending:
                self.stream.feed(pending)
        return usage

    def generate(self, messages: list, tools: list[dict] | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                 seed: int = 0, tool_choice: str | None = None) -> Reply:
        """Reply to `messages` (the whole conversation so far); the reply joins the session's log."""
        for _ in self.stream_tokens(messages, tools, max_new_tokens, temperature, top_p, stop, seed, tool_choice):
            pass
        return self.last_reply

    def stream_tokens(self, messages: list, tools: list[dict] | None = None, max_new_tokens: int = 64,
                      temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                      seed: int = 0, tool_choice: str | None = None) -> Iterator[str]:
        """Yield the reply's raw text piece by piece, one piece per generated token.

        A piece may be empty while a multi-byte character is incomplete, or while the text may
        be the start of a stop sequence. Text held back for a stop sequence that never completes
        comes as one more piece at the end. With `tools`, the reply's
        tool calls are parsed (see ctxmem.toolcalls) and stored with ids, so that the caller can
        send them back as structured calls. `tool_choice` is "auto" (None), "none", "required"
        or a tool's name; the last two start the reply with the template's call opening.
        `self.last_reply` is the whole Reply once the iterator is exhausted.
        """
        parsed = parse_messages(messages)
        choice = ToolChoice.resolve(self.tokenizer, tools, tool_choice)
        with self.turn() as appended:
            pending, usage = self._sync(parsed, tools, appended)
            renderer = Renderer(self.tokenizer, tools)
            opening = renderer.generation_prompt(parsed) + renderer.encode(choice.forced)
            usage.prompt_tokens += len(opening)
            usage.encoded_tokens += len(opening)
            generated: list[int] = []
            text, finish = "", "length"
            for token in self.stream.generate(pending + opening, max_new_tokens, temperature, top_p, seed,
                                              stop_ids=self._stop_ids(), banned_ids=choice.banned):
                generated.append(token)
                decoded = self.tokenizer.decode(generated)
                cut = _stop_at(decoded, stop)
                shown = decoded[:cut] if cut is not None else decoded[:len(decoded) - _stop_prefix(decoded, stop)]
                piece = shown[len(text):]
                text += piece
                yield piece
                if cut is not None:
                    finish = "stop"
                    break
            else:
                finish = "stop" if len(generated) < max_new_tokens else "length"
                if generated and len(decoded) > len(text):
                    yield decoded[len(text):]  # a held-back tail that no stop sequence completed
                    text = decoded
            self._finish_reply(parsed, tools, choice, opening, generated, choice.forced + text, finish, usage, appended)

    def _finish_reply(self, parsed: list[Message], tools: list[dict] | None, choice: ToolChoice, opening: list[int],
                      generated: list[int], raw: str, finish: str, usage: Usage, appended: list[dict]) -> None:
        """Parse the reply's tool calls, close its turn in the stream, and log it as a record."""
        reply, invalid = Message(role="assistant", content=raw), []
        if choice.syntax is not None and choice.parse:
            calls = choice.syntax.parse(raw, list(choice.names))
            reply, invalid = calls.as_message(), calls.invalid
        closing = Renderer(self.tokenizer, tools).closing(parsed, reply, generated=raw)
        if closing:
            self.stream.feed(closing)
        chain = hash_chain(parsed + [reply], tools)
        record = {"message": reply.as_dict(), "hash": chain[-1], "ids": opening + generated + closing}
        self.records.append(record)
        appended.append(record)
        usage.completion_tokens = len(generated)
        if reply.tool_calls and finish == "stop":
            finish = "tool_calls"
        self.last_reply = Reply(message=reply, token_ids=generated, usage=usage, finish_reason=finish, text=raw,
                                invalid_tool_calls=invalid)

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(configured) if isinstance(configured, list) else {configured}
        return {token for token in ids if token is not None}

    def saturation(self):
        return self.stream.saturation()

    @property
    def next_logits(self) -> torch.Tensor | None:
        """The logits [vocab] that predict the token after everything the session has encoded."""
        return self.stream._next_logits

    def release_device(self) -> None:
        """Drop the stream's tensors; the next turn reloads the session from Redis."""
        self._forget()

    def _forget(self) -> None:
        """Drop everything held in memory, so that the next turn starts from the last commit."""
        self.stream = self._new_stream()
        self.records, self.history, self._rolled_back_to = [], [], None
        self.version = -1


def _stop_prefix(text: str, stop: list[str] | None) -> int:
    """Return the length of the longest tail of `text` that may begin a stop sequence (held back)."""
    longest = 0
    for sequence in stop or []:
        for size in range(min(len(sequence) - 1, len(text)), longest, -1):
            if text.endswith(sequence[:size]):
                longest = size
                break
    return longest


def _stop_at(text: str, stop: list[str] | None) -> int | None:
    """Return where the first stop sequence starts in `text`, or None."""
    found = [text.find(sequence) for sequence in stop or [] if sequence and sequence in text]
    return min(found) if found else None
