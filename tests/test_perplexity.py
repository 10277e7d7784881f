"""The four ways of holding context agree where they must, and differ where they must."""

from __future__ import annotations

import math

import pytest
import torch

from ctxmem.config import CacheConfig
from ctxmem.eval.perplexity import evaluate
from tests.test_cache import random_ids, tiny_model

CONFIG = CacheConfig(sinks=4, window=60, chunk=16)


@pytest.mark.parametrize("method", ["window", "streaming", "recompute"])
def test_methods_equal_dense_inside_the_window(method):
    model = tiny_model("llama-gqa", "default")
    ids = random_ids(60)  # fits the window even without sinks
    dense = evaluate(model, ids, "dense", CONFIG)
    other = evaluate(model, ids, method, CONFIG)
    assert dense.tokens == 60
    assert other.tokens == 60
    assert other.perplexity == pytest.approx(dense.perplexity, rel=1e-5)


@torch.no_grad()
def test_methods_differ_after_evictions():
    model = tiny_model("qwen2", "default")
    ids = random_ids(400)
    results = {method: evaluate(model, ids, method, CONFIG).perplexity
               for method in ("dense", "window", "streaming", "recompute")}
    assert len({round(value, 6) for value in results.values()}) == 4


def test_unknown_method_rejected():
    model = tiny_model("llama-gqa", "default")
    with pytest.raises(ValueError, match="unknown method 'oracle'"):
        evaluate(model, random_ids(10), "oracle", CONFIG)


@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_streaming_scores_every_token(sinks):
    model = tiny_model("llama-gqa", "default")
    result = evaluate(model, random_ids(150), "streaming", CacheConfig(sinks=sinks, window=60, chunk=16))
    assert result.tokens == 150
    assert math.isfinite(result.perplexity)


def test_window_equals_streaming_without_sinks():
    # RoPE attention sees only relative positions, so shifting a sink-free window changes nothing.
    model = tiny_model("qwen2", "default")
    ids = random_ids(300)
    window = evaluate(model, ids, "window", CacheConfig(sinks=0, window=60, chunk=16))
    streaming = evaluate(model, ids, "streaming", CacheConfig(sinks=0, window=60, chunk=16))
    assert window.perplexity == pytest.approx(streaming.perplexity, rel=1e-5)
