"""Text generation with a plain transformers cache, and a chat turn that can run a toy tool.

NOTE: this path keeps the whole context in a growing cache, so a conversation cannot outgrow
the model's trained context. The bounded streaming cache is meant to replace it.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.reference.synthetic import parse_tool_call

logger = logging.getLogger(__name__)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Raise ValueError for a generation setting out of range, naming the value."""
    if max_new_tokens < 1:
        raise ValueError(f"invalid max_new_tokens {max_new_tokens}; use 1 or more")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid sampling settings temperature={temperature}, top_p={top_p}; "
                         "use temperature >= 0 and 0 < top_p <= 1")


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Return the new token ids after `prompt_ids`: greedy at temperature 0, else seeded sampling."""
    check_sampling(max_new_tokens, temperature, top_p)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        torch.tensor([prompt_ids], device=model.device),  # [1, prompt]
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_id,
        pad_token_id=stop_id if stop_id is not None else model.config.eos_token_id,
        **sampling,
    )
    new_ids = output[0, len(prompt_ids):].tolist()
    return new_ids[:-1] if new_ids and stop_id is not None and new_ids[-1] == stop_id else new_ids


def chat_reply(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None,
    max_new_tokens: int = 64,
) -> str:
    """Return the assistant's next message text for `messages`, rendered with the chat template."""
    prompt = tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = generate_ids(model, prompt, max_new_tokens=max_new_tokens, stop_id=tokenizer.eos_token_id)
    return tokenizer.decode(ids)


def chat_turn_with_tools(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    tools: list[dict],
    run_tool: Callable[[str, dict], str],
) -> list[dict]:
    """Generate the reply to the last user message, running one tool call if the model makes one.

    Returns the messages this turn added: either one assistant reply, or the tool call, the
    tool's result and the assistant's answer.
    """
    reply = chat_reply(model, tokenizer, messages, tools)
    call = parse_tool_call(reply)
    if call is None or not isinstance(call.get("arguments"), dict):
        return [{"role": "assistant", "content": reply}]

    name, arguments = str(call.get("name")), call["arguments"]
    call_message = {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}
    result = run_tool(name, arguments)
    logger.debug("tool %s(%s) returned %r", name, arguments, result)
    tool_message = {"role": "tool", "name": name, "content": result}
    answer = chat_reply(model, tokenizer, messages + [call_message, tool_message], tools)
    return [call_message, tool_message, {"role": "assistant", "content": answer}]
