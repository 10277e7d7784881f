"""Score landmarks against the model's latest queries, for the `relevant` and `retrieve` policies.

`QueryLog` keeps, per layer, the queries of the newest `keep` tokens of the last forward, as the
attention function saw them (rotated to their positions). `score` removes their rotation and
compares them with the landmarks' un-rotated keys, so the match is by content, as if query and
landmark stood at the same position.
"""

from __future__ import annotations

import torch

from ctxmem.rope import RotarySpec, rotate


class QueryLog:
    """The latest queries of each layer: [heads, keep, head_dim] and the positions they sat at."""

    def __init__(self, layers: int, keep: int):
        self.keep = keep
        self.queries: list[torch.Tensor | None] = [None] * layers
        self.first_position = 0  # position of the first token of the forward under way
        self.positions: torch.Tensor | None = None  # [keep or fewer]

    def begin(self, first_position: int) -> None:
        """Announce the position of the first token of the next forward."""
        self.first_position = first_position

    def observe(self, layer: int, query: torch.Tensor) -> None:
        """Keep the newest queries of `query` [batch, heads, q, head_dim] (batch entry 0)."""
        length = query.shape[-2]
        kept = min(self.keep, length)
        self.queries[layer] = query[0, :, length - kept:].detach()
        start = self.first_position + length - kept
        self.positions = torch.arange(start, start + kept)

    @property
    def ready(self) -> bool:
        return all(query is not None for query in self.queries)


def score(log: QueryLog, keys: torch.Tensor, spec: RotarySpec) -> torch.Tensor:
    """Rate landmarks by their match with the logged queries: [layers, n].

    `keys` [layers, n, kv_heads, entries, head_dim] are the landmarks' un-rotated keys. A
    landmark's score in a layer is, summed over KV heads, the mean over logged queries (of every
    query head sharing that KV head) of the best logit among its entries.
    """
    layers, count, kv_heads, _, head_dim = keys.shape
    scores = torch.empty(layers, count)
    for layer in range(layers):
        query = log.queries[layer].float()  # [heads, m, head_dim]
        query = rotate(query, -log.positions, spec)
        query = query.reshape(kv_heads, -1, head_dim)  # [kv_heads, groups * m, head_dim]; heads group per KV head
        layer_keys = keys[layer].to(query.device, torch.float32)  # [n, kv_heads, entries, head_dim]
        logits = torch.einsum("hqd,nhed->nhqe", query, layer_keys)  # [n, kv_heads, groups * m, entries]
        scores[layer] = logits.amax(-1).mean(-1).sum(-1).cpu() / head_dim ** 0.5
    return scores
