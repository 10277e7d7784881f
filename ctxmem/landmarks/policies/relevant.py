"""The `relevant` policy: per layer, the landmarks whose keys best match the current queries.

Each layer ranks the landmarks by its own scores, so a layer that looks for names and a layer
that looks for syntax may hold different landmarks. Re-selection happens when a chunk is
evicted and before a reply is generated, never per generated token.
"""

from __future__ import annotations

import torch

from ctxmem.landmarks.policies.base import Selection, best
from ctxmem.landmarks.policies.recent import Recent


class Relevant:
    """The `count` best-scoring landmarks of each layer, kept in text order within the slots."""

    name = "relevant"
    uses_queries = True

    def select(self, total: int, count: int, layers: int, scores: torch.Tensor | None) -> Selection:
        if scores is None:  # no query seen yet
            return Recent().select(total, count, layers, None)
        return Selection(landmarks=[best(layer_scores, count) for layer_scores in scores],
                         chunks=[[] for _ in range(layers)])
