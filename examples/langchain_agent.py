"""A LangChain agent on the bundled reference model: the model calls a toy tool, the agent runs it,
and the model answers with the tool's result. The conversation is a ctxmem session in Redis.

Run: python examples/langchain_agent.py ["What is the weather in Lima?"]
Offline; Redis from $CTXMEM_REDIS_URL, else ctxmem's embedded server. Exits 1 if the model
made no tool call.
"""

from __future__ import annotations

import sys
import uuid

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from ctxmem.reference import tools as toy
from langchain_ctxmem import ChatCtxMem


@tool
def clock(city: str) -> str:
    """Get the current time in a city."""
    return toy.clock(city)


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return toy.calculator(expression)


@tool
def weather(city: str) -> str:
    """Get the current weather in a city."""
    return toy.weather(city)


def main(question: str) -> int:
    model = ChatCtxMem(model="reference", max_tokens=48)
    agent = create_agent(model, tools=[clock, calculator, weather], system_prompt="You are a helpful assistant.")
    thread = f"agent-example-{uuid.uuid4().hex[:8]}"
    try:
        result = agent.invoke({"messages": [{"role": "user", "content": question}]},
                              config={"configurable": {"thread_id": thread}})
    finally:
        model.delete_session(thread)

    called = False
    for message in result["messages"]:
        if isinstance(message, AIMessage) and message.tool_calls:
            for call in message.tool_calls:
                print(f"tool call: {call['name']}({call['args']})  id={call['id']}")
                called = True
        elif isinstance(message, ToolMessage):
            print(f"tool result: {message.content}")
    answer = result["messages"][-1]
    print(f"answer: {answer.content}")
    usage = answer.usage_metadata or {}
    print(f"last turn: {usage.get('input_tokens')} prompt tokens, "
          f"{usage.get('input_token_details', {}).get('cache_read')} of them read from session {thread!r}")
    return 0 if called else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "What is the weather in Lima?"))
