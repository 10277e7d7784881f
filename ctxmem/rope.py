"""Rotary position embedding (RoPE) arithmetic for cached keys: apply, remove and re-rotate.

A RoPE key at position p is the raw key rotated pair by pair by the angles p * inv_freq. Moving
a cached key from position p to p + delta is one more rotation by delta * inv_freq, so the cache
can shift keys without recomputing them. Two pairing layouts exist:
- "half": dimension i pairs with i + rotary_dim / 2 (Llama, Mistral, Qwen2, Gemma, Phi, GPT-NeoX);
- "interleaved": dimension 2i pairs with 2i + 1 (GPT-J, CodeGen).
Only the first `rotary_dim` dimensions rotate; the rest pass through unchanged (partial rotary).

Re-rotation uses the model's own inverse frequencies and no attention scaling: YaRN and LongRoPE
fold a scaling factor into cos and sin, which multiplies key norms, and applying it on every
shift would compound it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

# Model types whose attention pairs dimensions i and i + d/2 ("rotate_half"), per their
# transformers 5 modeling files.
HALF_LAYOUT_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt_neox", "stablelm", "starcoder2", "olmo", "olmo2", "granite", "cohere", "internlm2",
    "smollm3", "exaone4", "helium",
})
INTERLEAVED_LAYOUT_MODEL_TYPES = frozenset({"gptj", "codegen"})


@dataclass(frozen=True)
class RotarySpec:
    """The rotation a model applies to keys: inverse frequencies, head size and pairing layout."""

    inv_freq: torch.Tensor  # [rotary_dim / 2], float32
    head_dim: int
    layout: str  # "half" or "interleaved"

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()


def rotary_spec(model: PreTrainedModel) -> RotarySpec:
    """Return the RotarySpec of `model`, read from its own rotary embedding module.

    Raises NotImplementedError for a model type whose pairing layout is not known here.
    """
    config = model.config
    model_type = config.model_type
    if model_type in HALF_LAYOUT_MODEL_TYPES:
        layout = "half"
    elif model_type in INTERLEAVED_LAYOUT_MODEL_TYPES:
        layout = "interleaved"
    else:
        raise NotImplementedError(
            f"re-rotation is not implemented for model type {model_type!r}: its RoPE pairing layout is "
            f"unknown to ctxmem; supported types: {', '.join(sorted(HALF_LAYOUT_MODEL_TYPES | INTERLEAVED_LAYOUT_MODEL_TYPES))}"
        )

    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "original_inv_freq"):
        raise NotImplementedError(f"model type {model_type!r} has no single rotary_emb module with inv_freq")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # original_inv_freq: dynamic NTK rewrites inv_freq past the trained length, but the cache
    # keeps every position inside it, so the original frequencies are the ones in force.
    return RotarySpec(inv_freq=rotary.original_inv_freq.detach().float().cpu(), head_dim=head_dim, layout=layout)


def _pairs(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rotary part `x` [..., rotary_dim] into the two members of each pair."""
    if layout == "half":
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def _join(first: torch.Tensor, second: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "half":
        return torch.cat((first, second), dim=-1)
    return torch.stack((first, second), dim=-1).flatten(-2)


def rotate(keys: torch.Tensor, positions: torch.Tensor, spec: RotarySpec) -> torch.Tensor:
    """Rotate `keys` [batch, kv_heads, seq, head_dim] by `positions` [seq] (may be negative).

    Rotating by p applies RoPE at position p to a raw key, and rotating by -p removes it. Rotating
    a RoPE key by delta moves it from p to p + delta. Computed in float32, returned in keys.dtype.
    """
    rotary_dim = spec.rotary_dim
    angles = positions.to(device=keys.device, dtype=torch.float32)[:, None] * spec.inv_freq.to(keys.device)
    cos, sin = angles.cos(), angles.sin()  # [seq, rotary_dim / 2]

    rotary = keys[..., :rotary_dim].float()
    first, second = _pairs(rotary, spec.layout)
    rotated = _join(first * cos - second * sin, second * cos + first * sin, spec.layout)
    if rotary_dim == keys.shape[-1]:
        return rotated.to(keys.dtype)
    return torch.cat((rotated.to(keys.dtype), keys[..., rotary_dim:]), dim=-1)


def implied_positions(keys: torch.Tensor, raw_keys: torch.Tensor, spec: RotarySpec) -> torch.Tensor:
    """Return the position each RoPE key in `keys` [..., seq, head_dim] encodes: [..., seq].

    `raw_keys` are the same keys before RoPE. The first frequency pair turns by inv_freq[0]
    radians per position, so its angle fixes the position exactly but only modulo one turn
    (about 6.28 positions for standard RoPE). The slowest pair turns less than once over any
    realistic cache, so it tells which turn the first pair is on.
    NOTE: exact while position * inv_freq[-1] < 2 pi (about 47,000 positions for head_dim 64
    and base 10000).
    """
    first, second = _pairs(keys[..., :spec.rotary_dim].float(), spec.layout)
    raw_first, raw_second = _pairs(raw_keys[..., :spec.rotary_dim].float(), spec.layout)
    turn = 2 * torch.pi
    angles = torch.remainder(torch.atan2(second, first) - torch.atan2(raw_second, raw_first), turn)  # [..., pairs]
    inv_freq = spec.inv_freq.to(keys.device)

    fine = angles[..., 0] / inv_freq[0]  # exact, modulo one turn of the first pair
    coarse = angles[..., -1] / inv_freq[-1]  # unambiguous, less precise
    period = turn / inv_freq[0]
    return fine + torch.round((coarse - fine) / period) * period
