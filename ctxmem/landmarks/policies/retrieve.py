"""The `retrieve` policy: landmark keys index the evicted chunks; the best ones come back whole.

Each layer restores the full keys and values of its `chunks` best-scoring chunks into the
retrieval region, as InfLLM restores its memory units, and fills the landmark slots with the
mean entries of the next best landmarks. Before any query is seen, the newest chunks are
restored.
"""

from __future__ import annotations

import torch

from ctxmem.landmarks.policies.base import Selection, best


class Retrieve:
    """Restore `chunks` chunks per layer; the landmark slots take the best of the rest."""

    name = "retrieve"
    uses_queries = True

    def __init__(self, chunks: int):
        if chunks < 1:
            raise ValueError(f"the retrieve policy restores at least 1 chunk, got {chunks}; pass --retrieve K")
        self.chunks = chunks

    def select(self, total: int, count: int, layers: int, scores: torch.Tensor | None) -> Selection:
        if scores is None:
            scores = torch.arange(total, dtype=torch.float32).expand(layers, total)  # newest first
        chunks = [best(layer_scores, self.chunks) for layer_scores in scores]
        landmarks = [best(layer_scores, count, exclude=set(restored))
                     for layer_scores, restored in zip(scores, chunks)]
        return Selection(landmarks=landmarks, chunks=chunks)
