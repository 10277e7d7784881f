"""Build a landmark from an evicted chunk: encode it, remove RoPE, compress per layer and KV head.

A landmark stands for a chunk of text that left the window. `encode_chunk` runs a real forward
pass over [sinks + chunk] at positions 0.., as if the chunk followed the sinks directly, and
takes the chunk's keys with RoPE removed, so they can later be rotated to any slot.
`compress` reduces them to the mean key and mean value per layer and KV head, or to k
centroids (k-means on the keys, values averaged over each centroid's tokens).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from ctxmem.rope import RotarySpec, rotate

KMEANS_ITERATIONS = 10


@torch.no_grad()
def encode_chunk(model: PreTrainedModel, spec: RotarySpec, sink_ids: list[int],
                 chunk_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the chunk's keys without RoPE and its values: each [layers, kv_heads, chunk, head_dim]."""
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([sink_ids + chunk_ids], device=model.device)  # [1, sinks + chunk]
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

    start = len(sink_ids)
    keys = torch.stack([layer.keys[0, :, start:] for layer in cache.layers])  # [layers, kv_heads, chunk, head_dim]
    values = torch.stack([layer.values[0, :, start:] for layer in cache.layers])
    positions = torch.arange(start, start + len(chunk_ids), device=keys.device)
    return rotate(keys, -positions, spec), values


def compress(keys: torch.Tensor, values: torch.Tensor, centroids: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce [layers, kv_heads, n, head_dim] keys and values to [layers, kv_heads, k, head_dim].

    k = 1 is the mean. For k > 1, k-means on the keys of each layer and head (seeded with
    evenly spaced tokens, so the result is deterministic) and the mean value of each cluster.
    An empty cluster keeps its seed token.
    """
    if centroids < 1 or centroids > keys.shape[-2]:
        raise ValueError(f"invalid centroids {centroids} for a chunk of {keys.shape[-2]} tokens; use 1 to the chunk size")
    if centroids == 1:
        return keys.float().mean(-2, keepdim=True).to(keys.dtype), values.float().mean(-2, keepdim=True).to(values.dtype)

    points, targets = keys.float(), values.float()
    seeds = torch.linspace(0, keys.shape[-2] - 1, centroids).round().long()
    centers, center_values = points[..., seeds, :], targets[..., seeds, :]  # [layers, kv_heads, k, head_dim]
    for _ in range(KMEANS_ITERATIONS):
        assignment = torch.cdist(points, centers).argmin(-1)  # [layers, kv_heads, n]
        members = torch.nn.functional.one_hot(assignment, centroids).float()  # [layers, kv_heads, n, k]
        counts = members.sum(-2)[..., None]  # [layers, kv_heads, k, 1]
        filled = counts > 0
        centers = torch.where(filled, members.transpose(-1, -2) @ points / counts.clamp(min=1), centers)
        center_values = torch.where(filled, members.transpose(-1, -2) @ targets / counts.clamp(min=1), center_values)
    return centers.to(keys.dtype), center_values.to(values.dtype)
