"""Runnable versions of the reference model's toy tools (clock, calculator, weather).

The model learned to call these by name during training; the demo and the examples run them.
Results are deterministic so that a demo prints the same reply on every run.
"""

from __future__ import annotations

import ast
import hashlib
import operator

from ctxmem.reference.synthetic import WEATHER

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / and parentheses."""
    def evaluate(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -evaluate(node.operand)
        raise ValueError(f"invalid expression {expression!r}; use numbers, + - * / and parentheses")

    try:
        value = evaluate(ast.parse(expression, mode="eval").body)
    except SyntaxError as error:
        raise ValueError(f"invalid expression {expression!r}; use numbers, + - * / and parentheses") from error
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.lower().encode()).digest()[:4], "big")


def clock(city: str) -> str:
    """Return a made-up but stable time of day for `city`, as HH:MM."""
    minutes = _digest(city) % (24 * 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def weather(city: str) -> str:
    """Return made-up but stable weather for `city`, as "sky, degrees C"."""
    value = _digest(city)
    return f"{WEATHER[value % len(WEATHER)]}, {value % 40 - 5} C"


TOOL_FUNCTIONS = {"clock": clock, "calculator": calculator, "weather": weather}


def run_tool(name: str, arguments: dict) -> str:
    """Run the toy tool `name` with its JSON arguments and return its result text."""
    if name not in TOOL_FUNCTIONS:
        raise ValueError(f"unknown tool {name!r}; the toy tools are: {', '.join(TOOL_FUNCTIONS)}")
    try:
        return TOOL_FUNCTIONS[name](**arguments)
    except TypeError as error:
        raise ValueError(f"invalid arguments {arguments!r} for tool {name!r}: {error}") from error
