"""LangChain messages turned into the message dicts a chat template takes.

Chat templates differ in what they accept: some have no system role, some raise unless user
and assistant alternate, some have no tool role. `TemplateRules.probe` finds out by rendering
small conversations, and `to_chat_messages` reshapes the history to fit. The reshaping is
deterministic, so the same history always gives the same messages, and a session can keep
encoding only what is new.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system",
          "developer": "system", "tool": "tool"}


@dataclass(frozen=True)
class TemplateRules:
    """The rules of a chat template: whether it accepts a system role, repeated roles and a tool role."""

    system: bool = True
    repeated_roles: bool = True
    tool: bool = True

    @classmethod
    def probe(cls, tokenizer: PreTrainedTokenizerBase) -> TemplateRules:
        call = {"id": "call_probe", "type": "function", "function": {"name": "probe", "arguments": {}}}
        return cls(
            system=_renders(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "s"),
            repeated_roles=_renders(tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "b"),
            tool=_renders(tokenizer, [{"role": "user", "content": "u"},
                                      {"role": "assistant", "content": "", "tool_calls": [call]},
                                      {"role": "tool", "tool_call_id": "call_probe", "content": "result-probe"}],
                          "result-probe"),
        )


def _renders(tokenizer: PreTrainedTokenizerBase, messages: list[dict], marker: str) -> bool:
    """Return True if the template renders `messages` without raising and keeps `marker`."""
    try:
        return marker in tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates raise jinja's TemplateError or their own exception types
        return False


def to_chat_messages(messages: list[BaseMessage], rules: TemplateRules) -> list[dict[str, Any]]:
    """Return the history as chat-template dicts, reshaped to the template's rules.

    Leading system messages merge into one. Without a system role, system text opens the next
    user message. Without a tool role, a tool result becomes a user message. Where roles must
    alternate, neighbours of one role merge.
    """
    converted = [_convert(position, message, messages) for position, message in enumerate(messages)]
    converted = _merge_leading_system(converted)
    if not rules.system:
        converted = [_as_user(item) if item["role"] == "system" else item for item in converted]
    if not rules.tool:
        converted = [_tool_as_user(item) if item["role"] == "tool" else item for item in converted]
    if not rules.repeated_roles or not rules.system:
        converted = _merge_neighbours(converted)
    return converted


def _convert(position: int, message: BaseMessage, history: list[BaseMessage]) -> dict[str, Any]:
    """Convert one LangChain message; the error names its position and what is wrong."""
    role = message.role if isinstance(message, ChatMessage) else message.type
    if role not in _ROLES:
        raise ValueError(f"message {position} has role {role!r}, which ChatCtxMem cannot send to a chat template; "
                         f"use one of {', '.join(sorted(_ROLES))}")
    item: dict[str, Any] = {"role": _ROLES[role], "content": _text(position, message)}
    if isinstance(message, AIMessage) and message.tool_calls:
        item["tool_calls"] = [{"id": call["id"], "type": "function",
                               "function": {"name": call["name"], "arguments": call["args"]}}
                              for call in message.tool_calls]
    if isinstance(message, ToolMessage):
        item["tool_call_id"] = message.tool_call_id
        name = message.name or _called_name(message.tool_call_id, history[:position])
        if name:
            item["name"] = name
    return item


def _text(position: int, message: BaseMessage) -> str:
    """Return a message's text; content blocks other than text are refused with a clear error."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call", "reasoning"):
            continue  # tool calls travel in tool_calls; reasoning is not sent back
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"message {position} has a {kind!r} content block; ChatCtxMem serves text-only "
                             "models, so send text (and tool calls) only")
    return "".join(parts)


def _called_name(call_id: str, earlier: list[BaseMessage]) -> str | None:
    """Return the tool name of the call `call_id` in an earlier AI message, if any."""
    for message in reversed(earlier):
        for call in getattr(message, "tool_calls", None) or []:
            if call.get("id") == call_id:
                return call["name"]
    return None


def _merge_leading_system(items: list[dict]) -> list[dict]:
    count = 0
    while count < len(items) and items[count]["role"] == "system":
        count += 1
    if count < 2:
        return items
    merged = {"role": "system", "content": "\n\n".join(item["content"] for item in items[:count] if item["content"])}
    return [merged] + items[count:]


def _as_user(item: dict) -> dict:
    return {"role": "user", "content": item["content"]}


def _tool_as_user(item: dict) -> dict:
    name = item.get("name") or "a tool"
    return {"role": "user", "content": f"Result of {name}: {item['content']}"}


def _merge_neighbours(items: list[dict]) -> list[dict]:
    """Merge each run of messages with one role (user, assistant) into one message."""
    merged: list[dict] = []
    for item in items:
        previous = merged[-1] if merged else None
        if previous is None or previous["role"] != item["role"] or item["role"] not in ("user", "assistant"):
            merged.append(dict(item))
            continue
        previous["content"] = "\n\n".join(text for text in (previous["content"], item["content"]) if text)
        if item.get("tool_calls"):
            previous["tool_calls"] = previous.get("tool_calls", []) + item["tool_calls"]
    return merged


def from_chat_messages(items: list[dict[str, Any]]) -> list[BaseMessage]:
    """Return stored chat-template dicts as LangChain messages; sending them back changes nothing."""
    messages: list[BaseMessage] = []
    for item in items:
        role, content = item["role"], item.get("content", "")
        if role == "system":
            messages.append(SystemMessage(content))
        elif role == "user":
            messages.append(HumanMessage(content))
        elif role == "tool":
            messages.append(ToolMessage(content, tool_call_id=item.get("tool_call_id") or "", name=item.get("name")))
        else:
            calls = [{"id": call["id"], "name": call["function"]["name"], "args": call["function"]["arguments"],
                      "type": "tool_call"} for call in item.get("tool_calls") or []]
            messages.append(AIMessage(content, tool_calls=calls))
    return messages
