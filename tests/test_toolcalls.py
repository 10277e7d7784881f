"""Tool-call syntax read off chat templates, reply parsing, and tool_choice resolution."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ctxmem.model import REFERENCE_MODEL_DIR
from ctxmem.reference.synthetic import TOOLS
from ctxmem.toolcalls import ToolChoice, ToolSyntax

# Hermes/Qwen style: the call's JSON on its own line between tags.
HERMES = """{%- for m in messages -%}
{{ '<|im_start|>' + m.role + '\\n' + (m.content or '') }}
{%- for c in (m.tool_calls or []) -%}{{ '<tool_call>\\n' + ({'name': c.function.name, 'arguments': c.function.arguments} | tojson) + '\\n</tool_call>' }}{%- endfor -%}
{{ '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"""
# A template that writes a call as bare JSON, without markers.
BARE = """{%- for m in messages -%}
{{ '[' + m.role + '] ' + (m.content or '') }}
{%- for c in (m.tool_calls or []) -%}{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}{%- endfor -%}
{{ '\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '[assistant] ' }}{%- endif -%}"""
NO_TOOLS = """{%- for m in messages -%}{{ m.role + ': ' + m.content + '\\n' }}{%- endfor -%}"""


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)


def with_template(tokenizer, template: str):
    tokenizer.chat_template = template
    return tokenizer


def test_reference_syntax_and_parse(tokenizer):
    syntax = ToolSyntax.probe(tokenizer)
    parsed = syntax.parse('Sure. <tool_call>{"name": "clock", "arguments": {"city": "Oslo"}}</tool_call>')

    assert (syntax.open, syntax.close) == ("<tool_call>", "</tool_call>")
    assert syntax.named.format(name="clock") == '<tool_call>{"name": "clock", "arguments": '
    assert parsed.content == "Sure. "
    assert [(call["name"], call["arguments"]) for call in parsed.calls] == [("clock", {"city": "Oslo"})]
    assert parsed.calls[0]["id"].startswith("call_")
    assert parsed.invalid == []


def test_hermes_syntax_parses_two_calls(tokenizer):
    syntax = ToolSyntax.probe(with_template(tokenizer, HERMES))
    text = ('<tool_call>\n{"name": "clock", "arguments": {"city": "Oslo"}}\n</tool_call>'
            '<tool_call>\n{"name": "weather", "arguments": {"city": "Lima"}}\n</tool_call>')
    parsed = syntax.parse(text)

    assert (syntax.open, syntax.close) == ("<tool_call>", "</tool_call>")
    assert [call["name"] for call in parsed.calls] == ["clock", "weather"]
    assert len({call["id"] for call in parsed.calls}) == 2


def test_bare_json_syntax(tokenizer):
    syntax = ToolSyntax.probe(with_template(tokenizer, BARE))

    assert syntax.open == ""
    assert syntax.parse('{"name": "clock", "arguments": {"city": "Oslo"}}').calls[0]["arguments"] == {"city": "Oslo"}
    assert syntax.parse("{not a call} but text").content == "{not a call} but text"


def test_template_without_tool_calls(tokenizer):
    assert ToolSyntax.probe(with_template(tokenizer, NO_TOOLS)) is None
    with pytest.raises(ValueError, match="tool_choice 'required' needs a chat template that writes tool calls"):
        ToolChoice.resolve(tokenizer, [TOOLS["clock"]], "required")


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "clock", "arguments": {"city": </tool_call>', "invalid JSON"),
    ('<tool_call>{"name": "clock", "arguments": "city"}</tool_call>', "a call needs a string 'name'"),
    ('<tool_call>{"name": "sundial", "arguments": {}}</tool_call>', "tool 'sundial' is not one of the tools (clock)"),
])
def test_bad_calls_are_invalid(tokenizer, text, error):
    parsed = ToolSyntax.probe(tokenizer).parse(text, names=["clock"])
    assert parsed.calls == []
    assert parsed.invalid[0]["error"].startswith(error)


def test_tool_choice_forms(tokenizer):
    tools = [TOOLS["clock"], TOOLS["weather"]]
    marker = tokenizer.convert_tokens_to_ids("<tool_call>")

    assert ToolChoice.resolve(tokenizer, tools, "required").forced == "<tool_call>"
    assert ToolChoice.resolve(tokenizer, tools[:1], "required").forced.endswith('"clock", "arguments": ')
    assert ToolChoice.resolve(tokenizer, tools, "weather").forced.endswith('"weather", "arguments": ')
    none = ToolChoice.resolve(tokenizer, tools, "none")
    assert none.banned == {marker}
    assert not none.parse
    with pytest.raises(ValueError, match="tool_choice 'sundial' is not one of the tools"):
        ToolChoice.resolve(tokenizer, tools, "sundial")
    with pytest.raises(ValueError, match="tool_choice 'required' needs tools"):
        ToolChoice.resolve(tokenizer, None, "required")
