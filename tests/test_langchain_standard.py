"""LangChain's standard chat-model suites, run against ChatCtxMem on the reference model and real Redis.

Each test that the small reference model cannot meet is marked xfail with the reason.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_ctxmem import ChatCtxMem
from tests.conftest import REDIS_URL

PREFIX = f"ctxmem-test:{uuid.uuid4().hex}"


@pytest.fixture(scope="module", autouse=True)
def _clean_redis():
    yield
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{PREFIX}*"):
        client.delete(key)
    client.close()


PARAMS = {"model": "reference", "device": "cpu", "dtype": "float32", "redis_url": REDIS_URL, "prefix": PREFIX}

_TOY_TOOLS = ("the reference model learned to call only its three toy tools (clock, calculator, weather); "
              "for other tools it writes a call with toy-tool arguments")
XFAIL = {
    "test_tool_calling": _TOY_TOOLS,
    "test_tool_calling_async": _TOY_TOOLS,
    "test_tool_calling_with_no_arguments": _TOY_TOOLS,
    "test_bind_runnables_as_tools": _TOY_TOOLS,
    "test_tool_choice": _TOY_TOOLS,
    "test_unicode_tool_call_integration": _TOY_TOOLS,
    "test_agent_loop": _TOY_TOOLS,
    **{f"{name}[{schema}]": "structured output is a forced tool call with the schema's fields; " + _TOY_TOOLS
       for name in ("test_structured_output", "test_structured_output_async") for schema in ("pydantic", "typeddict")},
    "test_structured_output_pydantic_2_v1": "structured output is a forced tool call; " + _TOY_TOOLS,
    "test_structured_output_optional_param": "structured output is a forced tool call; " + _TOY_TOOLS,
}


class ReferenceChatModel:
    """What both suites build: ChatCtxMem on the reference model, under this module's prefix."""

    @property
    def chat_model_class(self) -> type[ChatCtxMem]:
        return ChatCtxMem

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return PARAMS


class TestChatCtxMemUnit(ReferenceChatModel, ChatModelUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return {"CTXMEM_REDIS_URL": REDIS_URL}, {"prefix": PREFIX}, {"redis_url": REDIS_URL}


class TestChatCtxMemIntegration(ReferenceChatModel, ChatModelIntegrationTests):

    @property
    def supported_usage_metadata_details(self) -> dict[str, list]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """Two turns of one session: the second reads the first turn's tokens from memory."""
        model = ChatCtxMem(**PARAMS, max_tokens=20, session_id=f"cache-read-{uuid.uuid4().hex[:8]}")
        history = [SystemMessage("You are a helpful assistant."), HumanMessage("My name is Ada.")]
        history.append(model.invoke(history))
        history.append(HumanMessage("What is my name?"))
        if not stream:
            return model.invoke(history)
        full = None
        for chunk in model.stream(history):
            full = chunk if full is None else full + chunk
        return full
