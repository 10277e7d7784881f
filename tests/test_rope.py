"""RoPE arithmetic on keys: model-free checks against transformers' own rotation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ctxmem.rope import RotarySpec, implied_positions, rotary_spec, rotate
from tests.conftest import TINY_CONFIGS


def spec(head_dim: int = 16, rotary_dim: int | None = None, layout: str = "half", base: float = 10000.0) -> RotarySpec:
    rotary_dim = rotary_dim or head_dim
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    return RotarySpec(inv_freq=inv_freq, head_dim=head_dim, layout=layout)


def test_rotate_matches_transformers_llama():
    rope = spec(head_dim=16)
    keys = torch.randn(1, 2, 5, 16)  # [batch, kv_heads, seq, head_dim]
    positions = torch.arange(3, 8)
    angles = positions[:, None].float() * rope.inv_freq
    emb = torch.cat((angles, angles), dim=-1)[None]  # [1, seq, head_dim]
    _, expected = apply_rotary_pos_emb(keys, keys, emb.cos(), emb.sin())
    assert torch.allclose(rotate(keys, positions, rope), expected, atol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rerotation_composes(layout):
    rope = spec(head_dim=32, layout=layout)
    raw = torch.randn(2, 2, 4, 32)
    at_100 = rotate(raw, torch.full((4,), 100), rope)
    moved = rotate(at_100, torch.full((4,), -95), rope)
    assert torch.allclose(moved, rotate(raw, torch.full((4,), 5), rope), atol=1e-4)


def test_partial_rotary_leaves_tail_bit_identical():
    rope = spec(head_dim=80, rotary_dim=32)
    raw = torch.randn(1, 1, 3, 80)
    at_100 = rotate(raw, torch.full((3,), 100), rope)
    moved = rotate(at_100, torch.full((3,), -95), rope)
    assert torch.allclose(moved, rotate(raw, torch.full((3,), 5), rope), atol=1e-4)
    assert torch.equal(moved[..., 32:], raw[..., 32:])


def test_rotation_keeps_norms_with_large_factor():
    # Position-interpolated frequencies (factor 16) must not change key norms on re-rotation.
    rope = RotarySpec(inv_freq=spec(head_dim=64).inv_freq / 16, head_dim=64, layout="half")
    keys = torch.randn(1, 4, 10, 64)
    moved = rotate(keys, torch.arange(10) * 37 - 200, rope)
    assert torch.allclose(moved.norm(dim=-1), keys.norm(dim=-1), rtol=1e-5)


def test_implied_positions_read_back():
    rope = spec(head_dim=16)
    raw = torch.randn(1, 2, 300, 16)
    positions = torch.arange(300)
    implied = implied_positions(rotate(raw, positions, rope), raw, rope)
    assert torch.allclose(implied, positions.float().expand_as(implied), atol=1e-3)


def test_rotate_keeps_dtype():
    rope = spec(head_dim=16)
    keys = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    assert rotate(keys, torch.arange(4), rope).dtype == torch.bfloat16


@pytest.mark.parametrize("name, rotary_dim", [
    ("llama-gqa", 16), ("qwen2", 16), ("gemma-head-dim-48", 48), ("phi-partial-rotary", 8),
])
def test_spec_read_from_model(name, rotary_dim):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    rope = rotary_spec(model)
    assert rope.layout == "half"
    assert rope.rotary_dim == rotary_dim


def test_unknown_layout_rejected():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(NotImplementedError, match="'gpt2'"):
        rotary_spec(model)
