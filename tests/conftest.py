"""Shared fixtures: the reference model, real Redis under a test prefix, a private Redis, tiny models."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis
import torch
from transformers import AutoTokenizer, GemmaConfig, LlamaConfig, MistralConfig, PhiConfig, Qwen2Config
from transformers import AutoModelForCausalLM

from ctxmem.model import REFERENCE_MODEL_DIR, load_model
from ctxmem.reference import corpus
from tests.private_redis import PrivateRedis

REDIS_URL = "redis://127.0.0.1:6379/0"

# Small random-weight configs of several RoPE architectures: GQA, another head_dim, partial rotary.
TINY_CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=3072),
    "mistral": lambda: MistralConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=3, num_key_value_heads=1, vocab_size=3072,
                                     sliding_window=None),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, vocab_size=3072),
    "gemma-head-dim-48": lambda: GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                                             vocab_size=3072),
    "phi-partial-rotary": lambda: PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=3072),
}


@pytest.fixture(scope="session")
def reference() -> tuple:
    """The bundled reference model and tokenizer, loaded once, in float32 on the CPU."""
    torch.manual_seed(0)
    return load_model("reference", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def held_out_text() -> str:
    return corpus.held_out_text()


@pytest.fixture
def redis_client() -> Iterator[tuple[redis.Redis, str]]:
    """A real Redis client and a key prefix unique to this test; the test's keys are deleted after."""
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"ctxmem-test:{uuid.uuid4().hex}"
    yield client, prefix
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started private redis-server for outage tests, killed after the test."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Callable[[str], Path]:
    """Save a random-weight model of one of TINY_CONFIGS, with the reference tokenizer, to a folder."""
    def save(name: str) -> Path:
        folder = tmp_path / name
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(TINY_CONFIGS[name]()).save_pretrained(folder)
        AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR).save_pretrained(folder)
        return folder

    return save


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests a module lists in its XFAIL dict as expected failures.

    A key is a test's name with its parameters ("test_x[a]"), or without them for every case.
    """
    for item in items:
        listed = getattr(item.module, "XFAIL", {})
        reason = listed.get(item.name) or listed.get(getattr(item, "originalname", item.name))
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
