"""Tool calls in a model's reply: how its chat template writes them, how to read them back.

A chat template that supports tools renders an assistant tool call in its own syntax, for
example `<tool_call>{"name": "clock", "arguments": {"city": "Oslo"}}</tool_call>` (the
reference model and Hermes/Qwen-style models). `ToolSyntax.probe` renders a call with sentinel
values and reads off the text around the JSON, so the same code parses the replies of any
template that writes a call as one JSON object between fixed markers. A parsed call carries a
fresh id, which the session stores with the message, so the call keeps its id across turns.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from ctxmem.transcript import Message

logger = logging.getLogger(__name__)

_NAME = "ctxmem_probe_name"
_ARGUMENTS = {"ctxmem_probe_argument": 0}


@dataclass(frozen=True)
class ToolSyntax:
    """The text a template puts before a call's JSON (`open`) and after it (`close`).

    `named` is the text that opens a call to the tool `{name}` up to its arguments. A reply forced
    to start with it calls that tool.
    """

    open: str
    close: str
    named: str  # a str.format pattern with {name}

    @classmethod
    def probe(cls, tokenizer: PreTrainedTokenizerBase) -> ToolSyntax | None:
        """Render a sentinel tool call with the tokenizer's template; None if it writes no calls."""
        call = {"type": "function", "function": {"name": _NAME, "arguments": _ARGUMENTS}}
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        try:
            opened = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as error:  # a template that rejects tool calls raises its own exception types
            logger.debug("the chat template does not render tool calls: %s", error)
            return None
        if not full.startswith(opened) or _NAME not in full:
            return None
        body = full[len(opened):]
        start = body.find("{")
        end = _json_end(body, start)
        arguments = body.rfind("{", 0, max(body.find(next(iter(_ARGUMENTS))), 0))
        if start < 0 or end is None or arguments <= start:
            return None
        named = body[:arguments].replace("{", "{{").replace("}", "}}").replace(_NAME, "{name}")
        return cls(open=body[:start].strip(), close=_close_marker(body[end:]), named=named)

    def parse(self, text: str, names: list[str] | None = None) -> ParsedReply:
        """Split a reply into its text and its tool calls.

        A call that does not parse, or names a tool not in `names` (when given), is kept as invalid.
        """
        parsed = _parse_bare_json(text) if not self.open else self._parse_marked(text)
        if names is not None:
            unknown = [call for call in parsed.calls if call["name"] not in names]
            parsed.calls = [call for call in parsed.calls if call["name"] in names]
            parsed.invalid += [{"id": call["id"], "name": call["name"], "arguments": json.dumps(call["arguments"]),
                                "error": f"tool {call['name']!r} is not one of the tools ({', '.join(names)})"}
                               for call in unknown]
        return parsed

    def _parse_marked(self, text: str) -> ParsedReply:
        parsed = ParsedReply(content="")
        rest = text
        while (start := rest.find(self.open)) >= 0:
            parsed.content += rest[:start]
            body_start = start + len(self.open)
            end = rest.find(self.close, body_start) if self.close else -1
            body = rest[body_start:end if end >= 0 else len(rest)]
            _add_call(parsed, body)
            rest = rest[end + len(self.close):] if end >= 0 else ""
        parsed.content += rest
        return parsed


@dataclass
class ParsedReply:
    """A reply's text without its tool calls, the calls that parsed, and those that did not."""

    content: str
    calls: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments": dict}
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments": str, "error"}

    def as_message(self) -> Message:
        """Return the assistant message with the calls that parsed, in the transformers format."""
        calls = [{"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
                 for call in self.calls]
        return Message(role="assistant", content=self.content, tool_calls=calls or None)


@dataclass(frozen=True)
class ToolChoice:
    """How one reply may use tools: the text forced at its start, banned ids, whether calls are parsed.

    NOTE: "required" with several tools forces only the call's opening, so the model picks the
    name. No choice constrains the arguments to the tool's schema.
    NOTE: "none" bans the call's opening marker only where it is one token; elsewhere a call
    the model writes anyway stays in the reply's text.
    """

    syntax: ToolSyntax | None = None
    names: tuple[str, ...] = ()
    forced: str = ""
    banned: frozenset[int] = frozenset()
    parse: bool = True

    @classmethod
    def resolve(cls, tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None, choice: str | None) -> ToolChoice:
        """Check `choice` against the tools; raise ValueError naming the value and the accepted ones."""
        if not tools:
            if choice not in (None, "auto", "none"):
                raise ValueError(f"tool_choice {choice!r} needs tools; pass tools or leave tool_choice unset")
            return cls()
        syntax = ToolSyntax.probe(tokenizer)
        names = [tool.get("function", tool).get("name") for tool in tools]
        if choice in (None, "auto"):
            return cls(syntax=syntax, names=tuple(names))
        if syntax is None:
            raise ValueError(f"tool_choice {choice!r} needs a chat template that writes tool calls, and the "
                             f"template of {tokenizer.name_or_path!r} does not; leave tool_choice unset")
        if choice == "none":
            marker = tokenizer.encode(syntax.open, add_special_tokens=False)
            return cls(syntax=syntax, names=tuple(names), banned=frozenset(marker if len(marker) == 1 else ()),
                       parse=False)
        if choice in ("required", "any"):
            forced = syntax.named.format(name=names[0]) if len(names) == 1 else syntax.open
            return cls(syntax=syntax, names=tuple(names), forced=forced)
        if choice not in names:
            raise ValueError(f"tool_choice {choice!r} is not one of the tools ({', '.join(map(str, names))}); "
                             "use a tool's name, 'auto', 'none' or 'required'")
        return cls(syntax=syntax, names=tuple(names), forced=syntax.named.format(name=choice))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _add_call(parsed: ParsedReply, body: str) -> None:
    """Parse one call's JSON `body` into `parsed.calls`, or record why it failed in `parsed.invalid`."""
    body = body.strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as error:
        parsed.invalid.append({"id": new_call_id(), "name": None, "arguments": body, "error": f"invalid JSON: {error}"})
        return
    name = call.get("name") if isinstance(call, dict) else None
    arguments = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        parsed.invalid.append({"id": new_call_id(), "name": name if isinstance(name, str) else None,
                               "arguments": body, "error": "a call needs a string 'name' and an object 'arguments'"})
        return
    parsed.calls.append({"id": new_call_id(), "name": name, "arguments": arguments})


def _parse_bare_json(text: str) -> ParsedReply:
    """Parse a reply that is a call's JSON object and nothing else (templates without markers)."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return ParsedReply(content=text)
    parsed = ParsedReply(content="")
    _add_call(parsed, stripped)
    if parsed.invalid:
        return ParsedReply(content=text)  # plain text that happens to start with a brace
    return parsed


def _json_end(text: str, start: int) -> int | None:
    """Return the index after the JSON object that starts at `text[start]`, or None."""
    if start < 0:
        return None
    try:
        _, length = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return start + length


def _close_marker(after: str) -> str:
    """Return the marker that closes a call: the text after its JSON, up to a line break or a '<|'."""
    marker = after.strip()
    if marker.startswith("<") and ">" in marker:
        return marker[:marker.index(">") + 1]
    return ""
