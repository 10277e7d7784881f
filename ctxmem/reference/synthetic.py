"""Synthetic training and evaluation data for the reference model.

Three kinds of sequence teach a 256-token model what later long-context work measures:
- chats in the reference chat template, some with a JSON tool call to a toy tool, its result and
  an answer that uses the result;
- pass-key sequences: a fact stated early, filler text, then the question and the answer;
- repeated spans, which reward copying from context from the first training step, so that
  induction heads form in a model this small.

Every generator takes a `random.Random`, so a seed reproduces the data exactly; evaluation sets
use seeds that training never uses.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

PASS_KEY_STATEMENT = "The pass key is {key}. Remember it. "
PASS_KEY_QUESTION = " What is the pass key? The pass key is"

CITIES = (
    "Paris", "London", "Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Delhi", "Sydney", "Boston",
    "Madrid", "Berlin", "Dublin", "Vienna", "Quito", "Nairobi", "Seoul", "Denver", "Lagos", "Milan",
)
WEATHER = ("sunny", "rain", "cloudy", "snow", "fog", "windy", "storms", "clear skies")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Use a tool when one is needed.",
    "You are a friendly assistant.",
    "Answer briefly and use the tools when they help.",
)
SMALL_TALK = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Who are you?", "I am a small assistant that speaks a little like Shakespeare."),
    ("Thank you.", "You are welcome."),
    ("Tell me a line from a play.", "All the world's a stage, and all the men and women merely players."),
    ("Good morning.", "Good morning to you. What do you need?"),
    ("Can you help me?", "Yes. Tell me what you need."),
)


def tool_schema(name: str, description: str, parameter: str, parameter_description: str) -> dict:
    """Return an OpenAI-style function schema with one required string parameter."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {parameter: {"type": "string", "description": parameter_description}},
                "required": [parameter],
            },
        },
    }


TOOLS = {
    "clock": tool_schema("clock", "Get the current time in a city.", "city", "a city name"),
    "calculator": tool_schema(
        "calculator", "Evaluate an arithmetic expression.", "expression", "for example 3 * 4"
    ),
    "weather": tool_schema("weather", "Get the current weather in a city.", "city", "a city name"),
}


@dataclass(frozen=True)
class ToolTask:
    """One user request that needs a toy tool, with the expected call and the tool's result."""

    question: str
    tool: str
    arguments: dict[str, str]
    result: str
    answer: str


def _clock_task(rng: random.Random) -> ToolTask:
    city = rng.choice(CITIES)
    time = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"
    question = rng.choice((
        "What time is it in {c}?", "What is the time in {c} now?", "Tell me the time in {c}.",
        "Do you know the current time in {c}?", "Check the clock in {c} for me.",
    )).format(c=city)
    return ToolTask(question, "clock", {"city": city}, time, f"It is {time} in {city}.")


def _calculator_task(rng: random.Random) -> ToolTask:
    a, b = rng.randrange(2, 100), rng.randrange(2, 100)
    symbol, word, value = rng.choice((("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)))
    expression = f"{a} {symbol} {b}"
    question = rng.choice((
        "What is {a} {w} {b}?", "Compute {e}.", "Please calculate {e}.", "How much is {a} {w} {b}?",
        "Work out {e} for me.",
    )).format(a=a, b=b, w=word, e=expression)
    return ToolTask(question, "calculator", {"expression": expression}, str(value), f"{expression} = {value}.")


def _weather_task(rng: random.Random) -> ToolTask:
    city = rng.choice(CITIES)
    sky, degrees = rng.choice(WEATHER), rng.randrange(-10, 36)
    result = f"{sky}, {degrees} C"
    question = rng.choice((
        "What is the weather in {c}?", "How is the weather in {c} today?", "Is it raining in {c}?",
        "Tell me the weather in {c}.", "Should I take a coat in {c}?",
    )).format(c=city)
    return ToolTask(question, "weather", {"city": city}, result, f"In {city} it is {sky}, {degrees} C.")


TASK_MAKERS: dict[str, Callable[[random.Random], ToolTask]] = {
    "clock": _clock_task,
    "calculator": _calculator_task,
    "weather": _weather_task,
}


def tool_task(rng: random.Random) -> ToolTask:
    """Return a random request for one of the toy tools."""
    return TASK_MAKERS[rng.choice(sorted(TASK_MAKERS))](rng)


def tools_for(rng: random.Random, needed: str | None) -> list[dict]:
    """Return a shuffled subset of the toy tool schemas that contains `needed` (when given)."""
    names = [name for name in TOOLS if rng.random() < 0.6 or name == needed]
    rng.shuffle(names)
    return [TOOLS[name] for name in names]


def tool_call_message(task: ToolTask) -> dict[str, Any]:
    """Return the assistant message that calls the task's tool, in the transformers format."""
    call = {"type": "function", "function": {"name": task.tool, "arguments": task.arguments}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def tool_chat(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Return (messages, tools) for a whole tool-using exchange: request, call, result, answer."""
    task = tool_task(rng)
    messages = [
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": task.question},
        tool_call_message(task),
        {"role": "tool", "name": task.tool, "content": task.result},
        {"role": "assistant", "content": task.answer},
    ]
    return messages, tools_for(rng, task.tool)


def plain_chat(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Return (messages, tools) for small talk or in-chat recall, where no tool is needed."""
    messages: list[dict] = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
    if rng.random() < 0.5:
        user, reply = rng.choice(SMALL_TALK)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    else:
        name = rng.choice(("Ada", "Olivia", "Marcus", "Priya", "Tomas", "Yuki", "Viola", "Sebastian"))
        city = rng.choice(CITIES)
        messages += [
            {"role": "user", "content": f"My name is {name} and I live in {city}."},
            {"role": "assistant", "content": f"Nice to meet you, {name}."},
            {"role": "user", "content": rng.choice(("What is my name?", "Where do I live?"))},
        ]
        answer = f"Your name is {name}." if "name" in messages[-1]["content"] else f"You live in {city}."
        messages.append({"role": "assistant", "content": answer})
    return messages, (tools_for(rng, None) if rng.random() < 0.5 else [])


def random_chat(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Return one synthetic chat: two thirds use a tool."""
    return tool_chat(rng) if rng.random() < 0.67 else plain_chat(rng)


def tool_prompt(rng: random.Random) -> tuple[list[dict], list[dict], ToolTask]:
    """Return (messages, tools, task) ending at the user turn, for tool-call evaluation."""
    task = tool_task(rng)
    messages = [
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": task.question},
    ]
    return messages, tools_for(rng, task.tool), task


def pass_key(rng: random.Random) -> str:
    """Return a random five-digit pass key."""
    return str(rng.randrange(10_000, 100_000))


def pass_key_parts(key: str, filler: str) -> tuple[str, str]:
    """Return (prompt, answer) for a pass-key sequence around `filler`."""
    prompt = PASS_KEY_STATEMENT.format(key=key) + filler + PASS_KEY_QUESTION
    return prompt, f" {key}."


def parse_tool_call(text: str) -> dict | None:
    """Return the first `<tool_call>{json}</tool_call>` in `text` as a dict, or None."""
    start = text.find("<tool_call>")
    if start < 0:
        return None
    end = text.find("</tool_call>", start)
    body = text[start + len("<tool_call>"): end if end >= 0 else len(text)]
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    return call if isinstance(call, dict) else None
