"""Landmarks in a running stream: built per evicted chunk, placed in the slots, written to Redis."""

from __future__ import annotations

import pytest
import torch

from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.landmarks.builder import compress, encode_chunk
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.rope import rotary_spec
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.stream import Stream
from tests.test_cache import random_ids, tiny_model

SINKS, WINDOW, CHUNK = 4, 32, 8


def landmark_stream(model, slots: int = 2, store=None, **settings) -> Stream:
    memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(**settings), slots=slots, store=store,
                            session_id="memory-test", decode=lambda ids: " ".join(map(str, ids)))
    return Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=slots), memory=memory)


@torch.no_grad()
def test_recent_landmarks_fill_slots():
    model = tiny_model("llama-gqa", "default", layers=1)
    stream = landmark_stream(model)
    ids = random_ids(98)  # leaves the window two tokens short of full, so one more token evicts nothing
    stream.feed(ids)

    evicted = stream.cache.evicted_tokens
    assert len(stream.memory.landmarks) == evicted // CHUNK
    assert stream.cache.landmarks == 2
    assert stream.saturation().landmarks == 2
    assert stream.cache.length == SINKS + 2 + stream.cache.window_length
    newest = stream.memory.landmarks[-1].record
    assert (newest.token_start, newest.token_end) == (SINKS + evicted - CHUNK, SINKS + evicted)

    # The same cache built by hand: sinks, the two newest chunks' means at slots 4 and 5, the window.
    spec = rotary_spec(model)
    means = [compress(*encode_chunk(model, spec, ids[:SINKS], ids[start:start + CHUNK]))
             for start in (SINKS + evicted - 2 * CHUNK, SINKS + evicted - CHUNK)]
    keys = torch.cat([keys for keys, _ in means], dim=2)  # [layers, kv_heads, 2, head_dim]
    values = torch.cat([values for _, values in means], dim=2)
    manual = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=2))
    manual.feed(ids[:SINKS])
    manual.cache.place_landmarks([keys[0][None]], [values[0][None]])
    expected = manual.feed(ids[SINKS + evicted:] + [9]).next_logits

    assert torch.allclose(stream.feed([9]).next_logits, expected, atol=1e-4)


@torch.no_grad()
def test_window_source_equals_recompute_in_one_layer():
    # In one layer, a token's raw key and value depend on nothing but the token, so the window
    # KV taken at eviction equals the recomputed KV.
    model = tiny_model("qwen2", "default", layers=1)
    recomputed, windowed = landmark_stream(model), landmark_stream(model, source="window")
    ids = random_ids(90)
    recomputed.feed(ids)
    windowed.feed(ids)

    for a, b in zip(recomputed.memory.landmarks, windowed.memory.landmarks):
        assert torch.allclose(a.keys, b.keys, atol=1e-5)
        assert torch.allclose(a.values, b.values, atol=1e-5)


@torch.no_grad()
def test_landmarks_written_to_redis(redis_client):
    client, prefix = redis_client
    model = tiny_model("llama-gqa", "default")
    store = LandmarkStore(client, prefix=prefix)
    stream = landmark_stream(model, slots=4, store=store, centroids=2)
    ids = random_ids(80)
    stream.feed(ids)

    written = stream.memory.landmarks
    assert stream.memory.written == len(written) > 0
    assert store.indices("memory-test") == list(range(len(written)))
    first = store.get("memory-test", 0, fingerprint=stream.memory.fingerprint)
    assert torch.equal(first.keys, written[0].keys)
    assert first.record.text == " ".join(map(str, ids[SINKS:SINKS + CHUNK]))
    assert first.record.compression == "centroids:2"


def test_memory_needs_slots():
    model = tiny_model("llama-gqa", "default", layers=1)
    memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(), slots=1)
    with pytest.raises(ValueError, match="needs landmark_slots >= 1"):
        Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK), memory=memory)
