"""Numbers that summarise a landmark's tensors: key norm and per-layer statistics."""

from __future__ import annotations

import torch
from pydantic import BaseModel


class LayerStats(BaseModel):
    """Statistics of one layer's keys (without RoPE) and values, over KV heads and entries."""

    layer: int
    key_norm: float  # mean L2 norm of one entry's key vector
    key_mean: float
    key_std: float
    key_min: float
    key_max: float
    value_norm: float  # mean L2 norm of one entry's value vector
    value_mean: float
    value_std: float
    value_min: float
    value_max: float


def mean_norm(tensor: torch.Tensor) -> float:
    """Return the mean L2 norm of the vectors along the last dimension of `tensor` [..., head_dim]."""
    return float(tensor.float().norm(dim=-1).mean())


def layer_stats(keys: torch.Tensor, values: torch.Tensor) -> list[LayerStats]:
    """Return one LayerStats per layer of `keys` and `values` [layers, kv_heads, entries, head_dim]."""
    stats = []
    for layer, (layer_keys, layer_values) in enumerate(zip(keys.float(), values.float())):
        fields = {"layer": layer}
        for name, tensor in (("key", layer_keys), ("value", layer_values)):  # [kv_heads, entries, head_dim]
            fields.update({
                f"{name}_norm": mean_norm(tensor), f"{name}_mean": float(tensor.mean()),
                f"{name}_std": float(tensor.std(correction=0)), f"{name}_min": float(tensor.min()),
                f"{name}_max": float(tensor.max()),
            })
        stats.append(LayerStats(**fields))
    return stats
