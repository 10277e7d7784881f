"""The main job on the reference model: a chat turn that runs a tool, and an in-window pass key.

NOTE: this is the demo before sessions exist: it connects to Redis to prove the setup, but does
not store anything there yet.
"""

from __future__ import annotations

import logging
import random

from ctxmem.eval.reference_checks import pass_key_prompt
from ctxmem.generation import chat_turn_with_tools, generate_ids
from ctxmem.model import load_model
from ctxmem.reference import corpus, synthetic
from ctxmem.reference.tools import run_tool
from ctxmem.store.connection import connect, describe

logger = logging.getLogger(__name__)

DEMO_QUESTION = "What is 12 times 7?"
DEMO_PASS_KEY = "52817"
DEMO_FILLER_TOKENS = 150


def _message_text(message: dict) -> str:
    if message.get("tool_calls"):
        call = message["tool_calls"][0]["function"]
        return f"calls {call['name']}({call['arguments']})"
    return message["content"]


def run(model_name: str = "reference", device: str = "auto", dtype: str = "auto", redis_url: str | None = None) -> dict:
    """Run the demo and return what it did as a JSON-ready dict."""
    client = connect(redis_url)
    client.ping()
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": DEMO_QUESTION}]
    tools = list(synthetic.TOOLS.values())
    added = chat_turn_with_tools(model, tokenizer, messages, tools, run_tool)

    filler_ids = tokenizer.encode(corpus.load_play(corpus.HELD_OUT_PLAYS[0]), add_special_tokens=False)
    start = random.Random(0).randrange(len(filler_ids) - DEMO_FILLER_TOKENS)
    prompt = pass_key_prompt(tokenizer, DEMO_PASS_KEY, filler_ids[start:start + DEMO_FILLER_TOKENS])
    answer = tokenizer.decode(generate_ids(model, prompt, max_new_tokens=7)).strip()

    return {
        "redis": describe(client),
        "model": model_name,
        "chat": [{"role": m["role"], "text": _message_text(m)} for m in messages[1:] + added],
        "pass_key": {"expected": DEMO_PASS_KEY, "answer": answer, "distance": DEMO_FILLER_TOKENS,
                     "correct": answer.startswith(DEMO_PASS_KEY)},
    }
