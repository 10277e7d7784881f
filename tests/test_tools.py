"""The toy tools the reference model calls."""

from __future__ import annotations

import pytest

from ctxmem.reference.tools import calculator, clock, run_tool, weather


@pytest.mark.parametrize("expression, expected", [
    ("12 * 7", "84"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("-5 + 2", "-3"),
])
def test_calculator_evaluates(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression", ["__import__('os')", "2 **", "abs(-1)", "x + 1"])
def test_calculator_rejects_non_arithmetic(expression):
    with pytest.raises(ValueError, match="invalid expression"):
        calculator(expression)


def test_clock_and_weather_are_stable():
    assert clock("Oslo") == clock("oslo")
    hours, minutes = clock("Oslo").split(":")
    assert 0 <= int(hours) < 24
    assert 0 <= int(minutes) < 60
    assert weather("Lima").endswith(" C")


def test_run_tool_dispatches():
    assert run_tool("calculator", {"expression": "1 + 1"}) == "2"


def test_run_tool_rejects_unknown_tool():
    with pytest.raises(ValueError, match="unknown tool 'search'"):
        run_tool("search", {})


def test_run_tool_rejects_wrong_arguments():
    with pytest.raises(ValueError, match="invalid arguments"):
        run_tool("clock", {"town": "Rome"})
