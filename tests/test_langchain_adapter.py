"""ChatCtxMem on the reference model and real Redis: history shapes, tools, streaming, usage, sessions."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from transformers import AutoTokenizer

from ctxmem.model import REFERENCE_MODEL_DIR
from ctxmem.reference.synthetic import TOOLS
from ctxmem.store.sessions import SessionBusyError, SessionStore
from langchain_ctxmem import ChatCtxMem
from langchain_ctxmem.messages import TemplateRules, to_chat_messages
from tests.conftest import REDIS_URL

# A template in the style of Gemma's: no system role, and user and assistant must alternate.
ALTERNATING_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
{%- if message.role == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{{ '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"""

CLOCK = TOOLS["clock"]
QUESTION = [SystemMessage("You are a helpful assistant."), HumanMessage("What time is it in Oslo?")]


@pytest.fixture
def chat(redis_client) -> Any:
    """A factory of ChatCtxMem models on the reference model, under the test's Redis prefix."""
    _, prefix = redis_client

    def make(**fields: Any) -> ChatCtxMem:
        return ChatCtxMem(**{"model": "reference", "device": "cpu", "dtype": "float32", "redis_url": REDIS_URL,
                             "prefix": prefix, "max_tokens": 40, **fields})

    return make


def session_id() -> str:
    return f"lc-{uuid.uuid4().hex[:12]}"


def test_history_without_system_role(tmp_path, chat):
    """Case (a): [System, System(summary), Human, AI, Human] under a template with no system role."""
    folder = tmp_path / "alternating"
    shutil.copytree(REFERENCE_MODEL_DIR, folder)
    (folder / "chat_template.jinja").write_text(ALTERNATING_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    history = [SystemMessage("You are a helpful assistant."), SystemMessage("Summary: the user is Ada."),
               HumanMessage("Hello."), AIMessage("Hello! How can I help you today?"), HumanMessage("Who am I?")]

    rules = TemplateRules.probe(tokenizer)
    messages = to_chat_messages(history, rules)

    assert rules == TemplateRules(system=False, repeated_roles=False, tool=False)
    assert [message["role"] for message in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "You are a helpful assistant.\n\nSummary: the user is Ada.\n\nHello."
    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # raises if invalid
    reply = chat(model=str(folder)).invoke(history)
    assert reply.usage_metadata["output_tokens"] > 0


def test_history_with_empty_tool_call(chat):
    """Case (b): an AI message with empty content and a tool call, its ToolMessage, then a Human message."""
    call = {"id": "call_1", "name": "clock", "args": {"city": "Oslo"}}
    history = [*QUESTION, AIMessage(content="", tool_calls=[call]), ToolMessage("12:30", tool_call_id="call_1"),
               HumanMessage("Thanks. And in Lima?")]

    rules = TemplateRules.probe(chat().backend.tokenizer)
    messages = to_chat_messages(history, rules)
    reply = chat().bind_tools([CLOCK]).invoke(history)

    assert messages[2]["tool_calls"][0]["function"] == {"name": "clock", "arguments": {"city": "Oslo"}}
    assert messages[3] == {"role": "tool", "content": "12:30", "tool_call_id": "call_1", "name": "clock"}
    assert reply.usage_metadata["input_tokens"] > 40
    assert reply.content or reply.tool_calls


class TokenCounter(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


async def test_stream_matches_invoke_token_by_token(chat):
    """Case (c): stream() chunks add up to invoke(), one callback per token, astream_events agrees."""
    model = chat(max_tokens=24)
    history = [SystemMessage("You are a helpful assistant."), HumanMessage("Tell me about the sea.")]
    counter = TokenCounter()

    invoked = model.invoke(history)
    chunks = list(model.stream(history, config={"callbacks": [counter]}))
    events = [event async for event in model.astream_events(history, version="v2")
              if event["event"] == "on_chat_model_stream"]

    generated = invoked.usage_metadata["output_tokens"]
    assert "".join(chunk.content for chunk in chunks) == invoked.content
    assert len(chunks) == generated + 1  # one chunk per token, then the last one with usage and metadata
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata == invoked.usage_metadata
    assert counter.tokens == [chunk.content for chunk in chunks]
    assert [event["data"]["chunk"].content for event in events][:generated] == [c.content for c in chunks[:-1]]


def test_tool_call_survives_the_session_store(chat, redis_client):
    """Case (d): a tool call keeps its id and arguments through Redis and a fresh manager."""
    client, prefix = redis_client
    sid = session_id()
    reply = chat(session_id=sid).bind_tools([CLOCK], tool_choice="clock").invoke(QUESTION)
    call = reply.tool_calls[0]

    stored = SessionStore(client, prefix=prefix).messages(sid)[-1]["message"]
    assert stored["tool_calls"] == [{"id": call["id"], "type": "function",
                                     "function": {"name": "clock", "arguments": call["args"]}}]
    assert reply.response_metadata["finish_reason"] == "tool_calls"

    # max_sessions=3 makes another backend with its own manager: it loads the session from Redis,
    # as another process would.
    fresh = chat(session_id=sid, max_sessions=3).bind_tools([CLOCK])
    follow_up = fresh.invoke([*QUESTION, reply, ToolMessage("12:30", tool_call_id=call["id"])])
    assert follow_up.response_metadata["ctxmem"]["rolled_back"] is False
    assert follow_up.usage_metadata["input_token_details"]["cache_read"] == reply.response_metadata["ctxmem"]["tokens_seen"]


def test_second_turn_reads_the_first_from_memory(chat):
    model = chat(session_id=session_id())
    history = [SystemMessage("You are a helpful assistant."), HumanMessage("My name is Ada.")]
    first = model.invoke(history)
    second = model.invoke([*history, first, HumanMessage("What is my name?")])

    usage = second.usage_metadata
    cache_read = usage["input_token_details"]["cache_read"]
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    assert cache_read > 0
    assert cache_read == first.response_metadata["ctxmem"]["tokens_seen"]
    assert cache_read == usage["input_tokens"] - second.response_metadata["ctxmem"]["encoded_tokens"]


@pytest.mark.parametrize("how", ["bind", "session_id", "thread_id", "field"])
def test_session_id_sources(chat, redis_client, how):
    client, prefix = redis_client
    sid = session_id()
    if how == "bind":
        chat().bind(session_id=sid).invoke(QUESTION)
    elif how == "field":
        chat(session_id=sid).invoke(QUESTION)
    else:
        chat().invoke(QUESTION, config={"configurable": {how: sid}})
    assert SessionStore(client, prefix=prefix).message_count(sid) == 3


def test_call_without_session_leaves_nothing_in_redis(chat, redis_client):
    client, prefix = redis_client
    chat().invoke(QUESTION)
    assert list(client.scan_iter(match=f"{prefix}*")) == []


def test_tool_choice_none(chat):
    free = chat(max_tokens=30).bind_tools([CLOCK], tool_choice="none").invoke(QUESTION)
    assert free.tool_calls == []
    assert "<tool_call>" not in free.content


def test_stop_sequence_of_several_tokens_cuts_before_it(chat):
    model = chat(max_tokens=30)
    plain = model.invoke(QUESTION).content
    words = plain.split()
    stop = " ".join(words[1:3])  # two words from inside the reply: several tokens

    stopped = model.invoke(QUESTION, stop=[stop])
    streamed = "".join(chunk.content for chunk in model.stream(QUESTION, stop=[stop]))

    assert len(words) >= 3, plain
    assert stopped.content == plain[:plain.index(stop)]
    assert streamed == stopped.content
    assert stopped.response_metadata["finish_reason"] == "stop"


def test_forced_tool_call_streams_no_markup(chat):
    model = chat().bind_tools([CLOCK, TOOLS["weather"]], tool_choice="weather")
    invoked = model.invoke(QUESTION)
    chunks = list(model.stream(QUESTION))
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk

    assert invoked.tool_calls[0]["name"] == "weather"
    assert "".join(chunk.content for chunk in chunks) == invoked.content == ""
    assert [(call["name"], call["args"]) for call in full.tool_calls] == \
        [(call["name"], call["args"]) for call in invoked.tool_calls]


def test_rolled_back_turn_reads_nothing_from_memory(chat):
    model = chat(session_id=session_id())
    model.invoke([SystemMessage("You are a helpful assistant."), HumanMessage("My name is Ada.")])
    edited = model.invoke([SystemMessage("You are a helpful assistant."), HumanMessage("My name is Marcus.")])

    usage, metadata = edited.usage_metadata, edited.response_metadata["ctxmem"]
    assert metadata["rolled_back"] is True
    assert usage["input_token_details"]["cache_read"] == 0
    assert metadata["encoded_tokens"] == usage["input_tokens"]


def test_busy_session_not_retried(chat, redis_client, caplog):
    client, prefix = redis_client
    sid = session_id()
    model = chat(session_id=sid, timeout=0.2, max_retries=2)
    model.invoke(QUESTION)
    store = SessionStore(client, prefix=prefix)

    with store.lease(sid, wait=1.0), caplog.at_level("WARNING"):
        with pytest.raises(SessionBusyError, match="timed out after 0.2 s waiting for the lock"):
            model.invoke(QUESTION)
    chat(session_id=sid).invoke(QUESTION)

    assert "retrying" not in caplog.text
    assert model.backend.manager.session(sid).lock_wait == 30.0


def test_cut_tool_call_is_an_invalid_tool_call(chat):
    reply = chat(max_tokens=3).bind_tools([CLOCK], tool_choice="required").invoke(QUESTION)
    assert reply.tool_calls == []
    assert reply.invalid_tool_calls[0]["error"].startswith("invalid JSON")


def test_token_count_uses_the_chat_template(chat):
    model = chat()
    tokenizer = model.backend.tokenizer
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What time is it in Oslo?"}],
        tools=[CLOCK], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert model.get_num_tokens_from_messages(QUESTION, tools=[CLOCK]) == len(expected)


@pytest.mark.parametrize("bad, message", [
    ({"tool_choice": "sundial"}, "tool_choice 'sundial' is not one of the bound tools (clock)"),
])
def test_bad_tool_choice_names_the_value(chat, bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        chat().bind_tools([CLOCK], **bad)


def test_bad_input_is_refused_before_anything_is_stored(chat, redis_client):
    client, prefix = redis_client
    with pytest.raises(ValueError, match="invalid session id 'no spaces allowed'"):
        chat(session_id="no spaces allowed").invoke(QUESTION)
    with pytest.raises(ValueError, match="invalid session id ''"):
        chat().invoke(QUESTION, config={"configurable": {"thread_id": ""}})
    with pytest.raises(ValueError, match="seed must be an integer, got 'x'"):
        chat().bind(seed="x").invoke(QUESTION)
    with pytest.raises(ValueError, match="message 1 has a 'image_url' content block"):
        chat(session_id=session_id()).invoke([HumanMessage("Hi"), HumanMessage(content=[
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])])
    assert list(client.scan_iter(match=f"{prefix}*")) == []


@pytest.mark.parametrize("last", [AIMessage("Nice to meet you."), SystemMessage("Answer in one sentence."),
                                  ToolMessage("12:30", tool_call_id="call_9", name="clock")])
def test_any_role_may_come_last(chat, last):
    reply = chat(max_tokens=8).invoke([*QUESTION, last])
    assert reply.usage_metadata["output_tokens"] > 0
