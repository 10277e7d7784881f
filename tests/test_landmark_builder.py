"""Landmark building: the stored mean against an independent forward, and centroid compression."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ctxmem.landmarks.builder import compress, encode_chunk
from ctxmem.rope import rotary_spec, rotate
from tests.conftest import TINY_CONFIGS
from tests.streaming_reference import complex_rotate
from tests.test_cache import random_ids, tiny_model


def capture_keys(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run a plain forward and return each layer's RoPE keys and values [1, kv_heads, seq, head_dim]."""
    keys, values = [], []

    def probe(module, query, key, value, attention_mask, **kwargs):
        keys.append(key)
        values.append(value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ctxmem_capture", probe)
    AttentionMaskInterface.register("ctxmem_capture", sdpa_mask)
    model.set_attn_implementation("ctxmem_capture")
    with torch.no_grad():
        model(torch.tensor([ids]))
    model.set_attn_implementation("sdpa")
    return keys, values


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_mean_matches_independent_forward(name):
    model = tiny_model(name, "default")
    sinks, chunk = random_ids(4, seed=3), random_ids(16, seed=4)
    inv_freq = model.get_decoder().rotary_emb.inv_freq

    keys, values = compress(*encode_chunk(model, rotary_spec(model), sinks, chunk))

    rope_keys, plain_values = capture_keys(model, sinks + chunk)
    positions = torch.arange(4, 20)
    for layer, (layer_keys, layer_values) in enumerate(zip(rope_keys, plain_values)):
        raw = complex_rotate(layer_keys[:, :, 4:], -positions, inv_freq)[0]  # [kv_heads, chunk, head_dim]
        assert torch.allclose(keys[layer, :, 0], raw.mean(-2), atol=1e-5)
        assert torch.allclose(values[layer, :, 0], layer_values[0, :, 4:].mean(-2), atol=1e-5)


def test_slot_rotation_gives_mean_attention_logit():
    model = tiny_model("llama-gqa", "default")
    spec = rotary_spec(model)
    raw_keys, values = encode_chunk(model, spec, random_ids(4), random_ids(16, seed=5))
    mean_keys, _ = compress(raw_keys, values)
    query = torch.randn(16)
    slot = torch.tensor([7])

    landmark_logit = rotate(mean_keys[:, :, :1], slot, spec) @ query  # [layers, kv_heads, 1]
    token_logits = rotate(raw_keys, slot.expand(16), spec) @ query  # every chunk key encoded at the slot

    assert torch.allclose(landmark_logit[..., 0], token_logits.mean(-1), atol=1e-5)


def test_centroids_separate_clusters():
    keys = torch.cat((torch.randn(1, 1, 5, 8) * 0.01 + 3, torch.randn(1, 1, 7, 8) * 0.01 - 3), dim=-2)
    values = torch.cat((torch.ones(1, 1, 5, 8), torch.zeros(1, 1, 7, 8)), dim=-2)

    centers, center_values = compress(keys, values, centroids=2)

    assert centers.shape == (1, 1, 2, 8)
    assert torch.allclose(centers[0, 0, 0], keys[0, 0, :5].mean(0), atol=1e-6)
    assert torch.allclose(centers[0, 0, 1], keys[0, 0, 5:].mean(0), atol=1e-6)
    assert torch.equal(center_values[0, 0, :, 0], torch.tensor([1.0, 0.0]))


def test_compression_keeps_dtype():
    keys = torch.randn(2, 2, 16, 8, dtype=torch.bfloat16)
    for centroids in (1, 4):
        centers, center_values = compress(keys, keys.clone(), centroids)
        assert centers.dtype == torch.bfloat16
        assert center_values.shape == (2, 2, centroids, 8)


def test_invalid_centroid_count_rejected():
    with pytest.raises(ValueError, match="invalid centroids 9 for a chunk of 8 tokens"):
        compress(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), centroids=9)
