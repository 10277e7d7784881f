"""ChatCtxMem: a LangChain chat model over a local RoPE model whose memory lives in Redis.

Every call is one turn of a ctxmem `Session`. The session compares the history LangChain sends
with the one it stored, encodes only the new messages, streams the reply token by token and
commits it, so a conversation resumes in any process that shares the Redis server. A call
without a session id runs in a temporary session that is deleted when the call ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.caches import BaseCache
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from ctxmem.session import Reply, Session, SessionSettings
from ctxmem.store.keys import DEFAULT_PREFIX, validate_session_id
from ctxmem.store.sessions import SessionBusyError, SessionLockError
from ctxmem.toolcalls import ToolChoice

from langchain_ctxmem.backend import Backend, backend_for
from langchain_ctxmem.messages import from_chat_messages, to_chat_messages
from langchain_ctxmem.streaming import VisibleText

logger = logging.getLogger(__name__)


class ChatCtxMem(BaseChatModel):
    """A chat model served by ctxmem: sinks, a sliding window and landmarks, persisted in Redis.

    The session comes from, in order: a `session_id` call argument (`.bind(session_id=...)`),
    `config["configurable"]["session_id"]` or `["thread_id"]`, then the `session_id` field.

    NOTE: turns on one model run one at a time, and a `stream()` keeps the model's lock until it
    is exhausted or closed. Close a stream that you stop reading early.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str = Field(default="reference", description="'reference' (bundled) or a local model folder")
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1, description="most tokens generated per reply")
    stop: list[str] | None = Field(default=None, description="stop sequences applied to the reply text")
    timeout: float | None = Field(default=None, ge=0.0,
                                  description="seconds a call waits for another writer's session lock (None: 30)")
    max_retries: int = Field(default=2, ge=0,
                             description="retries of an invoke whose turn lost its session lock midway")
    streaming: bool = False
    seed: int = 0
    session_id: str | None = Field(default=None, description="the conversation's id in Redis")
    redis_url: str | None = Field(default_factory=lambda: os.environ.get("CTXMEM_REDIS_URL"),
                                  description="default $CTXMEM_REDIS_URL; None runs an embedded server")
    prefix: str = Field(default_factory=lambda: os.environ.get("CTXMEM_PREFIX", DEFAULT_PREFIX),
                        description="Redis key prefix; default $CTXMEM_PREFIX, else 'ctxmem'")
    session_settings: SessionSettings | None = Field(default=None, description="cache and landmarks of new sessions")
    max_sessions: int = Field(default=8, ge=1, description="sessions held on the device at once")
    ttl_seconds: int | None = Field(default=None, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    cache: BaseCache | bool | None = Field(default=False, exclude=True)  # LangChain's LLM cache is off by default

    _backend: Backend | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "ctxmem"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "session_settings": self.session_settings}

    @property
    def backend(self) -> Backend:
        """The shared model and memory manager; loaded on first use."""
        if self._backend is None:
            self._backend = backend_for(self.model, self.device, self.dtype, self.redis_url, self.prefix,
                                        self.session_settings, self.max_sessions, self.ttl_seconds,
                                        lock_timeout=30.0)
        return self._backend

    # Session ids from the run config

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        return super().invoke(input, config, stop=stop, **_with_session(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **_with_session(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        yield from super().stream(input, config, stop=stop, **_with_session(config, kwargs))

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        async for chunk in super().astream(input, config, stop=stop, **_with_session(config, kwargs)):
            yield chunk

    # Tools

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: str | bool | dict | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools, rendered by the model's chat template; `tool_choice` auto, none, any/required or a name."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted]
        choice = _tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    # Generation

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        for attempt in range(self.max_retries + 1):
            try:
                for event in self._turn(messages, stop, **kwargs):
                    if isinstance(event, tuple):
                        ending = event
                break
            except SessionBusyError:
                raise  # waited `timeout` for another writer already
            except SessionLockError as error:
                if attempt == self.max_retries:
                    raise
                logger.warning("turn lost its session lock (%s); retrying (%d of %d)", error, attempt + 1,
                               self.max_retries)
        message = self._message(*ending, kind=AIMessage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """Yield one chunk per generated token, then a last chunk with tool calls, usage and metadata."""
        visible, emitted = None, ""
        for event in self._turn(messages, stop, **kwargs):
            if isinstance(event, VisibleText):
                visible = event
                continue
            if isinstance(event, tuple):
                last = self._message(*event, kind=AIMessageChunk)
                content = event[0].message.content
                if not content.startswith(emitted):
                    logger.warning("streamed text %r is not a prefix of the reply's content %r", emitted, content)
                last.content = content[len(emitted):] if content.startswith(emitted) else ""
                last.chunk_position = "last"
                yield ChatGenerationChunk(message=last)
                return
            text = visible.add(event)
            piece, emitted = text[len(emitted):], text
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        """Run the turn in a worker thread and hand each chunk to the event loop as it is made."""
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        finished = object()

        def produce() -> None:
            try:
                for chunk in self._stream(messages, stop, None, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                    if cancelled.is_set():
                        break
            except BaseException as error:  # handed to the consumer, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, finished)

        worker = loop.run_in_executor(None, produce)
        try:
            while (item := await queue.get()) is not finished:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await worker

    def _turn(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any) -> Iterator[Any]:
        """Run one session turn; yield a VisibleText filter, the raw text pieces, then (Reply, metadata)."""
        backend = self.backend
        tools = kwargs.get("tools")
        chat = to_chat_messages(messages, backend.rules)
        choice = ToolChoice.resolve(backend.tokenizer, tools, kwargs.get("tool_choice"))
        session_id = _session_id(kwargs["session_id"] if "session_id" in kwargs else self.session_id)
        stops = [*(self.stop or []), *(stop or [])]
        with backend.lock:
            session = self._session(backend, session_id)
            try:
                yield VisibleText(choice.syntax if choice.parse else None, forced=choice.forced)
                pieces = session.stream_tokens(
                    chat, tools, max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
                    temperature=kwargs.get("temperature", self.temperature), top_p=kwargs.get("top_p", self.top_p),
                    stop=stops or None, seed=_seed(kwargs.get("seed", self.seed)), tool_choice=kwargs.get("tool_choice"))
                yield from pieces
                yield session.last_reply, _metadata(session, session_id)
            finally:
                if session_id is None:
                    backend.manager.delete(session.session_id)

    def _session(self, backend: Backend, session_id: str | None) -> Session:
        session = backend.manager.session(session_id or f"ephemeral-{uuid.uuid4().hex}")
        session.lock_wait = 30.0 if self.timeout is None else self.timeout  # copies share the session
        return session

    def _message(self, reply: Reply, metadata: dict[str, Any], kind: type) -> AIMessage | AIMessageChunk:
        """Build the reply message: content, tool calls, usage and ctxmem's metadata."""
        usage = reply.usage
        calls = reply.message.tool_calls or []
        fields: dict[str, Any] = {
            "content": reply.message.content,
            "usage_metadata": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                               "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                               "input_token_details": {"cache_read": usage.cached_tokens}},
            "response_metadata": {"model_name": self.model, "finish_reason": reply.finish_reason,
                                  "ctxmem": {**metadata, "encoded_tokens": usage.encoded_tokens,
                                             "rolled_back": usage.rolled_back}},
        }
        if kind is AIMessageChunk:
            fields["tool_call_chunks"] = [
                {"id": call["id"], "name": call["function"]["name"], "args": _json(call["function"]["arguments"]),
                 "index": index, "type": "tool_call_chunk"} for index, call in enumerate(calls)]
        else:
            fields["tool_calls"] = [{"id": call["id"], "name": call["function"]["name"],
                                     "args": call["function"]["arguments"], "type": "tool_call"} for call in calls]
        fields["invalid_tool_calls"] = [
            {"id": call["id"], "name": call["name"], "args": call["arguments"], "error": call["error"],
             "type": "invalid_tool_call"} for call in reply.invalid_tool_calls]
        return kind(**fields)

    def history(self, session_id: str | None = None) -> list[BaseMessage]:
        """Return a session's stored conversation as LangChain messages, to continue it in any process.

        The messages come back as the chat template took them (merged where the template needs
        it), so sending them again with a new message encodes only the new message.
        """
        session_id = _session_id(session_id or self.session_id)
        if session_id is None:
            raise ValueError("history() needs a session id: pass one, or set ChatCtxMem(session_id=...)")
        records = self.backend.manager.session_store.messages(session_id)
        return from_chat_messages([record["message"] for record in records])

    def delete_session(self, session_id: str | None = None) -> None:
        """Delete everything stored for a session: its messages, state, landmarks and chunks."""
        session_id = _session_id(session_id or self.session_id)
        if session_id is None:
            raise ValueError("delete_session() needs a session id: pass one, or set ChatCtxMem(session_id=...)")
        with self.backend.lock:
            self.backend.manager.delete(session_id)

    # Token counting

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[dict[str, Any] | type | Callable | BaseTool] | None = None) -> int:
        """Count the tokens of the prompt the model's chat template makes of `messages`."""
        backend = self.backend
        formatted = [convert_to_openai_tool(tool) for tool in tools] if tools else None
        chat = to_chat_messages(messages, backend.rules)
        ids = backend.tokenizer.apply_chat_template(chat, tools=formatted, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
        return len(ids)

    def get_num_tokens(self, text: str) -> int:
        return len(self.backend.tokenizer.encode(text, add_special_tokens=False))


def _metadata(session: Session, session_id: str | None) -> dict[str, Any]:
    """Return the session's id (None for a temporary one) and how full its cache is."""
    saturation = session.saturation()
    return {"session_id": session_id, "saturation": round(saturation.fraction, 4),
            "entries_used": saturation.entries_used, "budget": saturation.budget,
            "tokens_seen": saturation.tokens_seen, "evicted_tokens": saturation.evicted_tokens,
            "landmarks_injected": saturation.landmarks}


def _with_session(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add the session id from the run config (`session_id` or `thread_id`) unless a call argument set it."""
    if "session_id" in kwargs:
        return kwargs
    configurable = ensure_config(config).get("configurable") or {}
    for key in ("session_id", "thread_id"):
        if configurable.get(key) is not None:
            return {**kwargs, "session_id": str(configurable[key])}
    return kwargs


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed must be an integer, got {value!r}; pass for example seed=0")
    return value


def _session_id(value: Any) -> str | None:
    """Validate a session id at the boundary; the error names the value and the rule."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"session_id must be a string, got {value!r}; pass an id such as 'user-42'")
    return validate_session_id(value)


def _tool_choice(choice: str | bool | dict | None, names: list[str]) -> str | None:
    """Normalize LangChain's tool_choice forms to None, "none", "required" or a tool's name."""
    if choice in (None, "auto", False):
        return None
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if choice in ("none", "required") or choice in names:
        return choice
    raise ValueError(f"tool_choice {choice!r} is not one of the bound tools ({', '.join(names)}); "
                     "use 'auto', 'none', 'any', 'required' or a tool's name")


def _json(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)
