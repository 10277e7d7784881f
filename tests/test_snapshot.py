"""Saving a stream between turns and loading it into a fresh one: exact and recompute modes."""

from __future__ import annotations

import pytest
import torch

from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.rope import rotary_spec
from ctxmem.snapshot import capture, restore
from ctxmem.stream import Stream
from tests.conftest import TINY_CONFIGS
from tests.test_cache import random_ids, tiny_model

SINKS, WINDOW, CHUNK = 4, 32, 8


def make_stream(model, landmarks: LandmarkConfig | None, chunks: dict) -> Stream:
    slots = 2 if landmarks else 0
    retrieval = CHUNK if landmarks and landmarks.policy == "retrieve" else 0
    memory = LandmarkMemory(model, rotary_spec(model), landmarks, slots=slots) if landmarks else None
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=slots,
                                       retrieval_slots=retrieval), memory=memory)
    stream.on_chunk = lambda index, ids, keys, values: chunks.__setitem__(index, (keys.clone(), values.clone()))
    return stream


def resumed(model, landmarks, state: dict, chunks: dict, original: Stream, exact: bool) -> Stream:
    stream = make_stream(model, landmarks, chunks)
    if original.memory is not None:  # what a session loads from the landmark store
        stream.memory.landmarks = list(original.memory.landmarks)
        stream.memory.chunks = list(original.memory.chunks)
    restore(stream, state, chunks.__getitem__ if exact else None)
    return stream


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_exact_resume_equals_a_stream_that_never_stopped(name):
    model = tiny_model(name, "default")
    first, later = random_ids(SINKS + 3 * WINDOW + 5), random_ids(40, seed=7)
    chunks: dict = {}
    original = make_stream(model, None, chunks)
    original.feed(first)
    original.emit_chunks()
    state = capture(original, exact=True)

    copy = resumed(model, None, state, chunks, original, exact=True)
    assert copy.cache.length == original.cache.length
    assert torch.allclose(copy._next_logits, original._next_logits)
    assert torch.allclose(copy.feed(later).next_logits, original.feed(later).next_logits, atol=1e-4)
    assert copy.saturation() == original.saturation()


@pytest.mark.parametrize("landmarks", [LandmarkConfig(), LandmarkConfig(policy="relevant"),
                                       LandmarkConfig(policy="retrieve", retrieve=1, source="window")],
                         ids=["recent", "relevant", "retrieve"])
@torch.no_grad()
def test_exact_resume_with_landmarks(landmarks):
    model = tiny_model("llama-gqa", "default")
    first, later = random_ids(SINKS + 3 * WINDOW + 5), random_ids(40, seed=7)
    chunks: dict = {}
    original = make_stream(model, landmarks, chunks)
    original.feed(first)
    original.emit_chunks()
    state = capture(original, exact=True)

    copy = resumed(model, landmarks, state, chunks, original, exact=True)
    assert copy.memory.selection == original.memory.selection
    assert torch.allclose(copy.feed(later, score=True).nll, original.feed(later, score=True).nll, atol=1e-4)


@torch.no_grad()
def test_recompute_resume_keeps_tokens_and_differs_by_a_little():
    model = tiny_model("qwen2", "default")
    first, later = random_ids(SINKS + 3 * WINDOW + 5), random_ids(40, seed=7)
    original = make_stream(model, None, {})
    original.feed(first)
    state = capture(original, exact=False)
    assert "pinned_kv" not in state

    copy = resumed(model, None, state, {}, original, exact=False)
    assert copy.window_ids == original.window_ids
    assert copy.saturation() == original.saturation()
    resumed_nll, original_nll = copy.feed(later, score=True).nll, original.feed(later, score=True).nll
    assert not torch.allclose(resumed_nll, original_nll, atol=1e-4)  # the window lost its evicted context
    assert (resumed_nll.mean() - original_nll.mean()).abs() < 1.0


@torch.no_grad()
def test_chunks_are_emitted_once_in_order():
    model = tiny_model("llama-gqa", "default")
    seen: list[int] = []
    stream = make_stream(model, None, {})
    stream.on_chunk = lambda index, ids, keys, values: seen.append(index)
    stream.feed(random_ids(SINKS + 3 * WINDOW + 5))
    evicted_chunks = stream.cache.evicted_tokens // CHUNK
    assert seen == list(range(evicted_chunks))
    stream.emit_chunks()
    assert seen == list(range((stream.cache.evicted_tokens + stream.cache.window_length) // CHUNK))
