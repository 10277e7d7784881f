"""The bounded streaming cache against two independent paths.

1. The StreamingLLM formulation (tests/streaming_reference.py): keys kept before RoPE and
   rotated afresh to in-cache positions on every step, fed one token at a time.
2. For one-layer models, a fresh forward over [sinks + kept window tokens] at positions 0..n-1.
Both for several architectures, with default and YaRN RoPE.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctxmem.cache import StreamingCache
from ctxmem.config import CacheConfig
from ctxmem.rope import rotary_spec
from ctxmem.stream import Stream
from tests.conftest import TINY_CONFIGS
from tests.streaming_reference import RawKeyCache

SINKS, WINDOW, CHUNK = 4, 36, 8
ROPES = {
    "default": None,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def tiny_model(name: str, rope: str, layers: int = 2):
    config = TINY_CONFIGS[name]()
    config.num_hidden_layers = layers
    if ROPES[rope] is not None:
        config.rope_parameters = {**config.rope_parameters, **ROPES[rope]}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def random_ids(count: int, seed: int = 1) -> list[int]:
    return torch.randint(10, 3000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def random_pieces(ids: list[int], seed: int = 2) -> list[list[int]]:
    """Split `ids` into pieces of 1 to 50 tokens, so feeds cross evictions at arbitrary points."""
    rng, pieces, start = random.Random(seed), [], 0
    while start < len(ids):
        size = rng.randint(1, 50)
        pieces.append(ids[start:start + size])
        start += size
    return pieces


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_matches_streamingllm_reference(name, rope):
    model = tiny_model(name, rope)
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK))
    reference = RawKeyCache(model.config.num_hidden_layers, model.get_decoder().rotary_emb.inv_freq,
                            SINKS, WINDOW, CHUNK)
    ids = random_ids(200)

    worst, fed = 0.0, 0
    for piece in random_pieces(ids):
        streamed = stream.feed(piece).next_logits
        for token in piece:
            expected = reference.feed_token(model, token)
        fed += len(piece)
        worst = max(worst, (streamed - expected).abs().max().item())
        assert stream.cache.length == reference.get_seq_length()
        assert stream.cache.length <= stream.cache.capacity

    assert stream.cache.evicted_tokens >= 150 - WINDOW
    assert worst <= 1e-4, f"max abs logit difference {worst:.2e} after {stream.cache.eviction_events} evictions"


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_one_layer_matches_fresh_forward(name, rope):
    model = tiny_model(name, rope, layers=1)
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK))
    ids = random_ids(150)

    streamed = stream.feed(ids).next_logits
    kept = ids[:SINKS] + ids[stream.cache.evicted_tokens + SINKS:]
    fresh = model(torch.tensor([kept])).logits[0, -1]

    assert stream.cache.length == len(kept)
    assert torch.allclose(streamed, fresh, atol=1e-4), (streamed - fresh).abs().max()


@torch.no_grad()
def test_chunked_prefill_equals_token_by_token():
    model = tiny_model("llama-gqa", "default")
    config = CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK)
    chunked, single = Stream(model, config), Stream(model, config)
    ids = random_ids(300)

    chunked.feed(ids)
    for token in ids:
        single.feed([token])

    assert chunked.cache.evicted_tokens == single.cache.evicted_tokens
    for a, b in zip(chunked.cache.layers, single.cache.layers):
        assert torch.allclose(a.keys[:, :, :a.length], b.keys[:, :, :b.length], atol=1e-5)
        assert torch.allclose(a.values[:, :, :a.length], b.values[:, :, :b.length], atol=1e-5)


@torch.no_grad()
def test_long_prefill_memory_bound():
    """A 5,000-token input never runs a forward over more than one chunk beside the cache."""
    model = tiny_model("qwen2", "default")
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK))
    pieces = []
    original = model.forward

    def recording_forward(*args, **kwargs):
        pieces.append(kwargs["input_ids"].shape[-1])
        return original(*args, **kwargs)

    model.forward = recording_forward
    stream.feed(random_ids(5000))

    assert max(pieces) <= CHUNK
    assert stream.cache.capacity == SINKS + WINDOW
    assert stream.cache.layers[0].keys.shape[-2] == stream.cache.capacity
    assert stream.tokens_seen == 5000


@torch.no_grad()
def test_placed_landmarks_keep_positions_contiguous():
    model = tiny_model("llama-gqa", "default", layers=1)
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=3))
    ids = random_ids(60)
    stream.feed(ids)
    cache = stream.cache
    window_ids = ids[SINKS + cache.evicted_tokens:]
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    landmark_keys = [torch.randn(1, config.num_key_value_heads, 2, head_dim)]  # one layer, un-rotated
    landmark_values = [torch.randn(1, config.num_key_value_heads, 2, head_dim)]

    cache.place_landmarks(landmark_keys, landmark_values)
    with_landmarks = stream.feed([7]).next_logits

    # The same state built directly: sinks, the landmarks at slots 4 and 5, then the window.
    assert cache.landmarks == 2
    assert cache.window_start == SINKS + 2
    assert cache.length == SINKS + 2 + len(window_ids) + 1
    fresh = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=3))
    fresh.feed(ids[:SINKS])
    fresh.cache.place_landmarks(landmark_keys, landmark_values)
    expected = fresh.feed(window_ids + [7]).next_logits
    assert torch.allclose(with_landmarks, expected, atol=1e-4), (with_landmarks - expected).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_buffers(dtype):
    model = tiny_model("llama-gqa", "default").to(dtype)
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK))
    logits = stream.feed(random_ids(120)).next_logits

    assert stream.cache.layers[0].keys.dtype == dtype
    assert torch.isfinite(logits).all()


def test_capacity_beyond_model_range_rejected():
    model = tiny_model("llama-gqa", "default")
    with pytest.raises(ValueError, match="does not fit the model's"):
        Stream(model, CacheConfig(sinks=4, window=model.config.max_position_embeddings))


def test_overflowing_piece_rejected():
    model = tiny_model("llama-gqa", "default", layers=1)
    stream = Stream(model, CacheConfig(sinks=4, window=12, chunk=4))
    with pytest.raises(ValueError, match="crosses the end of the pinned region"):
        stream.cache.make_room(5)
    stream.feed([11, 12, 13, 14])
    with pytest.raises(ValueError, match="exceeds the window of 12"):
        stream.cache.make_room(13)
