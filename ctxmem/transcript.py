"""Chat messages as a session sees them: validated, hash-chained, and rendered one delta at a time.

Agent frameworks send the whole message list every turn. A session compares the hash chain of
that list with the chain it stored, keeps the common prefix, and encodes only what follows.
`Renderer` turns each new message into the tokens the chat template adds for it, by rendering
the conversation up to and including the message and cutting off the rendering without it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")


class Message(BaseModel):
    """One chat message; tool calls and tool results keep their ids and arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the message as the dict chat templates take, without unset fields."""
        return self.model_dump(exclude_none=True)


def parse_messages(messages: list[Any]) -> list[Message]:
    """Validate a list of message dicts (or Messages); the error names the message and the field."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    parsed = []
    for position, message in enumerate(messages):
        try:
            parsed.append(message if isinstance(message, Message) else Message.model_validate(message))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'message'}: {item['msg']}"
                                 for item in error.errors())
            raise ValueError(f"invalid message {position} ({str(message)[:60]!r}): {problems}; "
                             f"a message needs a role ({', '.join(ROLES)}) and string content") from None
    return parsed


def hash_chain(messages: list[Message], tools: list[dict] | None = None) -> list[str]:
    """Return one hex digest per message, each covering the tools and every message up to it."""
    digest = hashlib.sha256(_canonical(tools or [])).hexdigest()
    chain = []
    for message in messages:
        digest = hashlib.sha256(digest.encode() + _canonical(message.as_dict())).hexdigest()
        chain.append(digest)
    return chain


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def common_prefix(stored: list[str], incoming: list[str]) -> int:
    """Return how many leading hashes the two chains share."""
    count = 0
    for old, new in zip(stored, incoming):
        if old != new:
            break
        count += 1
    return count


class TemplateError(ValueError):
    """The chat template does not render a conversation as a prefix of its continuation."""


class Renderer:
    """Renders messages with the tokenizer's chat template and cuts the rendering into deltas."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; sessions need one")
        self.tokenizer, self.tools = tokenizer, tools or None

    def text(self, messages: list[Message], generation_prompt: bool = False) -> str:
        if not messages and not generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template([m.as_dict() for m in messages], tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def suffix(self, before: str, after: str) -> str:
        """Return what `after` adds to `before`; raise TemplateError if `before` is not its prefix."""
        if not after.startswith(before):
            raise TemplateError(
                f"the chat template of {self.tokenizer.name_or_path!r} does not render incrementally: the text of "
                f"a conversation ({before[-40:]!r}) is not a prefix of its continuation ({after[:len(before)][-40:]!r}); "
                "sessions need a template that renders earlier messages the same whatever follows")
        return after[len(before):]

    def deltas(self, messages: list[Message], start: int) -> list[list[int]]:
        """Return the token ids each of messages[start:] adds to the rendering of those before it."""
        previous = self.text(messages[:start])
        pieces = []
        for end in range(start + 1, len(messages) + 1):
            current = self.text(messages[:end])
            pieces.append(self.encode(self.suffix(previous, current)))
            previous = current
        return pieces

    def generation_prompt(self, messages: list[Message]) -> list[int]:
        """Return the tokens that open the assistant's reply after `messages`."""
        return self.encode(self.suffix(self.text(messages), self.text(messages, generation_prompt=True)))

    def closing(self, messages: list[Message], reply: Message, generated: str | None = None) -> list[int]:
        """Return the tokens that close `reply` after its `generated` text (for example an end-of-turn).

        The template writes a tool call in its own spacing, which may differ from the model's.
        Then the closing is what the template writes after a plain reply.
        """
        opened = self.text(messages, generation_prompt=True) + (reply.content if generated is None else generated)
        full = self.text(messages + [reply])
        if full.startswith(opened):
            return self.encode(full[len(opened):])
        sentinel = "ctxmem-end-of-turn-probe"
        plain = self.text(messages + [Message(role="assistant", content=sentinel)])
        return self.encode(plain[plain.rindex(sentinel) + len(sentinel):])
