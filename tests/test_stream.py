"""Stream behaviour: cases from public bug reports of context shifting, saturation, system sinks."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PhiConfig
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from ctxmem.config import CacheConfig
from ctxmem.generation import generate_ids
from ctxmem.rope import implied_positions, rotary_spec, rotate
from ctxmem.saturation import Saturation
from ctxmem.stream import Stream
from tests.streaming_reference import complex_rotate
from tests.test_cache import random_ids, tiny_model

SINKS, WINDOW, CHUNK = 4, 36, 8


@torch.no_grad()
def test_reused_stream_takes_new_turns():
    """Report (a): a session reused after its window filled, each turn bringing only new tokens."""
    model = tiny_model("llama-gqa", "default")
    seen: list[Saturation] = []
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK), on_saturation=seen.append)
    stream.feed(random_ids(100))
    assert stream.cache.window_length > WINDOW - CHUNK  # the window has filled and slid

    for turn in range(5):
        reply = list(stream.generate(random_ids(6, seed=turn), max_new_tokens=12))
        assert len(reply) == 12

    assert all(s.budget == SINKS + WINDOW for s in seen)
    assert all(s.entries_used <= s.budget for s in seen)
    assert stream.tokens_seen == 100 + 5 * (6 + 12)  # every reply token is fed back for the next turn
    assert stream.saturation().evicted_tokens > 0


def record_attention(calls: list[tuple[int, int]]):
    """Register an eager attention that records (mask width, key length) of every call."""
    def probe(module, query, key, value, attention_mask, **kwargs):
        calls.append((attention_mask.shape[-1], key.shape[-2]))
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ctxmem_probe", probe)
    AttentionMaskInterface.register("ctxmem_probe", eager_mask)


@torch.no_grad()
def test_qwen2_generation_past_small_window():
    """Report (b): Qwen2, window 64, 4 sinks, 20-token prompt, 200 generated tokens."""
    model = tiny_model("qwen2", "default")
    calls: list[tuple[int, int]] = []
    record_attention(calls)
    model.set_attn_implementation("ctxmem_probe")
    positions: list[int] = []
    stream = Stream(model, CacheConfig(sinks=4, window=64, chunk=16))
    stream.on_saturation = lambda s: positions.append(s.entries_used - 1)

    new_ids = list(stream.generate(random_ids(20), max_new_tokens=200))

    assert len(new_ids) == 200
    assert stream.cache.capacity == 68
    assert max(positions) < stream.cache.capacity
    assert stream.cache.evicted_tokens > 0
    assert calls
    assert all(width == keys for width, keys in calls)


@torch.no_grad()
def test_implied_positions_have_no_gaps():
    """Report (c): after every decode step, cached keys encode positions 0..n-1, newest at n-1."""
    model = tiny_model("llama-gqa", "default")
    inv_freq = model.get_decoder().rotary_emb.inv_freq
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK))
    layer = stream.cache.layers[0]
    raw_keys: list[torch.Tensor] = []  # one [kv_heads, head_dim] per cached entry, before RoPE
    write = layer.update

    def recording_update(key_states, value_states, *args, **kwargs):
        positions = torch.arange(layer.length, layer.length + key_states.shape[-2])
        raw_keys.extend(complex_rotate(key_states, -positions, inv_freq)[0].unbind(1))
        return write(key_states, value_states, *args, **kwargs)

    layer.update = recording_update
    evicted = 0

    def check(saturation: Saturation) -> None:
        nonlocal evicted
        del raw_keys[SINKS:SINKS + saturation.evicted_tokens - evicted]
        evicted = saturation.evicted_tokens
        n = saturation.entries_used
        implied = implied_positions(layer.keys[:, :, :n], torch.stack(raw_keys, dim=1)[None], stream.spec)
        assert torch.allclose(implied, torch.arange(n).float().expand_as(implied), atol=1e-2)

    stream.on_saturation = check
    list(stream.generate(random_ids(10), max_new_tokens=120))

    assert stream.cache.eviction_events >= 3
    assert len(raw_keys) == stream.cache.length


def test_partial_rotary_rerotation_exact():
    """Report (d): head_dim 80, rotary_dim 32: moving a key from 100 to 5 equals encoding it at 5."""
    config = PhiConfig(hidden_size=160, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.4})
    model = AutoModelForCausalLM.from_config(config)
    spec = rotary_spec(model)
    assert (spec.head_dim, spec.rotary_dim) == (80, 32)
    raw = torch.randn(1, 2, 1, 80)  # [batch, kv_heads, seq, head_dim]

    def encode(position: int) -> torch.Tensor:
        cos, sin = model.get_decoder().rotary_emb(raw, torch.tensor([[position]]))
        rot, tail = raw[..., :32], raw[..., 32:]
        _, key = apply_rotary_pos_emb(rot, rot, cos, sin)
        return torch.cat((key, tail), dim=-1)

    moved = rotate(encode(100), torch.tensor([-95]), spec)

    assert torch.allclose(moved, encode(5), atol=1e-5)
    assert torch.equal(moved[..., 32:], raw[..., 32:])


def test_yarn_rerotation_keeps_norms():
    """Report (e): with YaRN factor 16, re-rotation leaves key norms unchanged."""
    model = tiny_model("llama-gqa", "default")
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "yarn", "factor": 16.0,
                                    "original_max_position_embeddings": 128}
    model = AutoModelForCausalLM.from_config(model.config)
    assert model.get_decoder().rotary_emb.attention_scaling > 1  # YaRN folds a scale into cos and sin
    keys = torch.randn(1, 2, 50, 16)

    moved = rotate(keys, torch.arange(50) * 7 - 100, rotary_spec(model))

    assert torch.allclose(moved.norm(dim=-1), keys.norm(dim=-1), rtol=1e-5)


@torch.no_grad()
def test_saturation_reports_budget_and_evictions():
    model = tiny_model("llama-gqa", "default")
    seen: list[Saturation] = []
    stream = Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK), on_saturation=seen.append)
    stream.feed(random_ids(20))
    stream.feed(random_ids(40))

    first, last = seen
    assert (first.tokens_seen, first.entries_used, first.budget, first.evicted_tokens) == (20, 20, 40, 0)
    assert first.fraction == pytest.approx(0.5)
    assert last.tokens_seen == 60
    assert last.evicted_tokens == 24
    assert last.eviction_events == 3
    assert last.entries_used == 60 - 24
    assert last.entries_used == last.pinned + last.window_tokens
    assert Saturation.model_validate_json(last.model_dump_json()) == last


@torch.no_grad()
def test_system_message_stays_pinned():
    model = tiny_model("llama-gqa", "default")
    model.config.max_position_embeddings = 64
    stream = Stream(model, CacheConfig(sinks="system", chunk=CHUNK))
    system = random_ids(23, seed=5)
    with pytest.raises(ValueError, match="call pin"):
        stream.feed([1, 2, 3])

    stream.pin(system)
    pinned_keys = stream.cache.layers[1].keys[:, :, :23].clone()
    stream.feed(random_ids(300))

    assert stream.cache.pinned == 23
    assert stream.cache.capacity == 64
    assert stream.cache.evicted_tokens > 0
    assert stream.cache.evicted_tokens % CHUNK == 0
    assert torch.equal(stream.cache.layers[1].keys[:, :, :23], pinned_keys)


@torch.no_grad()
def test_generation_matches_transformers(reference):
    """Inside the window, streaming generation equals transformers' own greedy generate."""
    model, tokenizer = reference
    prompt = tokenizer.encode("To be, or not to be, that is", add_special_tokens=True)
    stream = Stream(model, CacheConfig(sinks=4))

    ours = list(stream.generate(prompt, max_new_tokens=30))

    assert ours == generate_ids(model, prompt, max_new_tokens=30)
    assert stream.cache.capacity == model.config.max_position_embeddings


def test_sampling_is_seeded():
    model = tiny_model("llama-gqa", "default")
    runs = [list(Stream(model, CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK))
                 .generate(random_ids(5), max_new_tokens=40, temperature=0.9, top_p=0.9, seed=seed))
            for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
