"""The reference chat template: roles, tools in the system block, tool calls and the generation prompt."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ctxmem.model import REFERENCE_MODEL_DIR
from ctxmem.reference import synthetic


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)


def render(tokenizer, messages, tools=None, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def test_roles_render_in_order(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    text = render(tokenizer, messages)
    assert text == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"


def test_tools_listed_in_system_block(tokenizer):
    tools = [synthetic.TOOLS["clock"], synthetic.TOOLS["calculator"]]
    text = render(tokenizer, [{"role": "user", "content": "Hi"}], tools)
    assert text.startswith("<|bos|><|system|>\nTools:\n- clock(city): Get the current time in a city.\n")
    assert "- calculator(expression): Evaluate an arithmetic expression.<|end|>" in text


def test_tool_call_and_result_render(tokenizer):
    task = synthetic.ToolTask("What is 2 plus 3?", "calculator", {"expression": "2 + 3"}, "5", "2 + 3 = 5.")
    messages = [{"role": "user", "content": task.question}, synthetic.tool_call_message(task),
                {"role": "tool", "content": "5"}]
    text = render(tokenizer, messages, generation_prompt=True)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3"}}</tool_call>'
    assert f"<|assistant|>\n{call}<|end|>\n<|tool|>\n5<|end|>\n<|assistant|>\n" in text
    assert synthetic.parse_tool_call(text) == {"name": "calculator", "arguments": {"expression": "2 + 3"}}


def test_string_arguments_kept_verbatim(tokenizer):
    message = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "clock", "arguments": '{"city": "Oslo"}'}}]}
    text = render(tokenizer, [message])
    assert '<tool_call>{"name": "clock", "arguments": {"city": "Oslo"}}</tool_call>' in text


def test_template_starts_with_one_bos(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


def test_plain_text_gets_bos(tokenizer):
    ids = tokenizer.encode("To be, or not to be")
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]) == "To be, or not to be"


def test_tool_tags_are_single_tokens(tokenizer):
    for tag in ("<tool_call>", "</tool_call>"):
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1
    text = tokenizer.decode(tokenizer.encode("<tool_call>{}</tool_call>"), skip_special_tokens=True)
    assert text == "<tool_call>{}</tool_call>"


def test_digits_are_single_tokens(tokenizer):
    assert len(tokenizer.encode("48213", add_special_tokens=False)) == 5


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>{"name": "clock", "arguments": {"city": "Rome"}}</tool_call>', "clock"),
    ('Sure. <tool_call>{"name": "weather", "arguments": {}}', "weather"),
])
def test_parse_tool_call_finds_call(text, expected):
    assert synthetic.parse_tool_call(text)["name"] == expected


@pytest.mark.parametrize("text", ["no call here", "<tool_call>{not json}</tool_call>", "<tool_call>[1, 2]</tool_call>"])
def test_parse_tool_call_rejects_malformed(text):
    assert synthetic.parse_tool_call(text) is None

