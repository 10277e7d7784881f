"""Load the bundled reference model, ask it a question that needs a tool, and run the tool.

Run: python examples/quickstart.py   (offline; about ten seconds on a laptop CPU)
"""

from __future__ import annotations

import ctxmem
from ctxmem.generation import chat_turn_with_tools
from ctxmem.reference.synthetic import TOOLS
from ctxmem.reference.tools import run_tool


def main() -> None:
    model, tokenizer = ctxmem.load_model("reference")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Lima?"},
    ]
    for message in chat_turn_with_tools(model, tokenizer, messages, list(TOOLS.values()), run_tool):
        content = message["content"] or message["tool_calls"][0]["function"]
        print(f"{message['role']:>9}: {content}")


if __name__ == "__main__":
    main()
