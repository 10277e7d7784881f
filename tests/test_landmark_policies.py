"""Landmark policies (recent, relevant, retrieve), query scoring, the attention hook and its bias."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from ctxmem.attention import ctxmem_attention, hooked, install
from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.landmarks.policies import Recent, Relevant, Retrieve, Selection, make_policy
from ctxmem.landmarks.scoring import QueryLog, score
from ctxmem.rope import rotary_spec, rotate
from ctxmem.stream import Stream
from tests.conftest import TINY_CONFIGS
from tests.test_cache import random_ids, tiny_model

SINKS, WINDOW, CHUNK = 4, 32, 8


class FixedPolicy:
    """Always the given selection, to test placement apart from scoring."""

    name, uses_queries = "fixed", True

    def __init__(self, selection: Selection):
        self.selection = selection

    def select(self, total, count, layers, scores):
        return self.selection


def test_recent_takes_newest_in_every_layer():
    selection = Recent().select(total=5, count=2, layers=3, scores=None)
    assert selection.landmarks == [[3, 4]] * 3
    assert selection.chunks == [[], [], []]


def test_relevant_takes_best_per_layer_in_text_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.0, 0.2, 0.1]])
    selection = Relevant().select(total=4, count=2, layers=2, scores=scores)
    assert selection.landmarks == [[1, 3], [0, 2]]


def test_relevant_without_queries_falls_back_to_recent():
    assert Relevant().select(total=4, count=2, layers=1, scores=None).landmarks == [[2, 3]]


def test_retrieve_fills_both_regions():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3]])
    selection = Retrieve(2).select(total=5, count=2, layers=1, scores=scores)
    assert selection.chunks == [[1, 3]]
    assert selection.landmarks == [[2, 4]]


def test_unknown_policy_and_bad_retrieve_rejected():
    with pytest.raises(ValueError, match="unknown landmark policy 'oldest'"):
        make_policy("oldest")
    with pytest.raises(ValueError, match="--retrieve K"):
        LandmarkConfig(policy="retrieve")
    with pytest.raises(ValueError, match="--landmark-policy retrieve"):
        LandmarkConfig(retrieve=2)


@pytest.mark.parametrize("name", ["llama-gqa", "phi-partial-rotary"])
def test_score_matches_content_whatever_the_query_position(name):
    # A landmark whose key is the un-rotated query scores highest, though the query was rotated
    # to a far position: scoring removes the query's rotation.
    model = tiny_model(name, "default")
    spec, config = rotary_spec(model), model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    raw_query = torch.randn(heads, 1, head_dim, generator=torch.Generator().manual_seed(3))
    log = QueryLog(layers=1, keep=4)
    log.begin(200)
    log.observe(0, rotate(raw_query, torch.tensor([200]), spec)[None])  # [1, heads, 1, head_dim]

    keys = torch.randn(1, 6, kv_heads, 1, head_dim, generator=torch.Generator().manual_seed(4))
    keys[0, 4] = raw_query.reshape(kv_heads, -1, head_dim).mean(1, keepdim=True) * 3  # [kv_heads, 1, head_dim]
    assert int(score(log, keys, spec)[0].argmax()) == 4


class Head(torch.nn.Module):
    layer_idx = 0
    num_key_value_groups = 1
    is_causal = True


def test_log_count_bias_weighs_an_entry_like_its_copies():
    # One key with a bias of log 3 attracts exactly the attention of three copies of it.
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 1, 1, 8, generator=generator)
    keys = torch.randn(1, 1, 2, 8, generator=generator)
    values = torch.randn(1, 1, 2, 8, generator=generator)

    class Bias:
        def observe(self, layer, query):
            pass

        def key_bias(self, layer, kv_length):
            return torch.tensor([0.0, math.log(3)])

    with hooked(Bias()):
        biased, _ = ctxmem_attention(Head(), query, keys, values, None, scaling=1.0)
    copies = torch.cat((keys, keys[:, :, 1:].expand(1, 1, 2, 8)), dim=2)
    copied_values = torch.cat((values, values[:, :, 1:].expand(1, 1, 2, 8)), dim=2)
    plain, _ = ctxmem_attention(Head(), query, copies, copied_values, None, scaling=1.0)
    assert torch.allclose(biased, plain, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_installed_attention_equals_sdpa(name):
    # With the hook active (queries logged, no bias), a stream scores every token as before.
    ids = random_ids(80)
    plain = Stream(tiny_model(name, "default"), CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK)).feed(ids, score=True)
    model = tiny_model(name, "default")
    install(model)
    memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(policy="relevant"), slots=2)
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=2), memory=memory)
    hooked_result = stream.feed(ids[:SINKS + WINDOW], score=True)  # no eviction yet, so no landmark
    assert model.config._attn_implementation == "ctxmem"
    assert torch.allclose(hooked_result.nll, plain.nll[:SINKS + WINDOW - 1], atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_restored_chunk_gives_back_the_evicted_cache(name):
    # Evict the first window chunk, restore it whole right after the sinks: the cache is the
    # uncompressed prefix again, so the next logits equal a dense forward over it.
    model = tiny_model(name, "default")
    memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(policy="retrieve", retrieve=1), slots=0)
    memory.policy = FixedPolicy(Selection(landmarks=[[]] * 2, chunks=[[0]] * 2))
    config = CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, retrieval_slots=CHUNK)
    stream = Stream(model, config, memory=memory)
    ids = random_ids(SINKS + WINDOW + 1)

    logits = stream.feed(ids).next_logits
    assert stream.cache.evicted_tokens == CHUNK
    assert stream.cache.retrieved == CHUNK
    dense = model(input_ids=torch.tensor([ids]), cache=DynamicCache(config=model.config)).logits[0, -1]
    assert torch.allclose(logits, dense, atol=1e-4)
    assert stream.saturation().retrieved == CHUNK


@torch.no_grad()
def test_retrieval_slots_must_hold_the_chunks():
    model = tiny_model("llama-gqa", "default")
    memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(policy="retrieve", retrieve=2), slots=0)
    with pytest.raises(ValueError, match="retrieval_slots >= 16"):
        Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, retrieval_slots=8), memory=memory)


@torch.no_grad()
def test_refresh_places_the_selection_of_the_prompt_queries():
    # After a prompt, `refresh` re-selects with its queries and encodes its last piece again;
    # the cache keeps its length, and a second refresh finds nothing to change.
    model = tiny_model("llama-gqa", "default")
    config = CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=1)
    stream = Stream(model, config, memory=LandmarkMemory(model, rotary_spec(model),
                                                         LandmarkConfig(policy="relevant"), slots=1))
    stream.feed(random_ids(SINKS + 3 * WINDOW + 5))
    length, window_ids = stream.cache.length, list(stream.window_ids)
    wanted = stream.memory.select()

    stream.refresh()
    assert stream.memory.selection == wanted
    assert stream.cache.length == length
    assert stream.window_ids == window_ids
    assert stream.refresh() is False


@torch.no_grad()
def test_bias_changes_the_stream_only_through_landmark_entries():
    model = tiny_model("qwen2", "default")
    ids = random_ids(SINKS + 2 * WINDOW)

    def run(bias: bool) -> torch.Tensor:
        memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(bias=bias), slots=2)
        stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=2), memory=memory)
        return stream.feed(ids, score=True).nll

    plain, biased = run(False), run(True)
    first_eviction = SINKS + WINDOW  # token index of the first input after the first eviction
    assert torch.allclose(plain[:first_eviction - 1], biased[:first_eviction - 1], atol=1e-5)
    assert not torch.allclose(plain[first_eviction:], biased[first_eviction:], atol=1e-3)
