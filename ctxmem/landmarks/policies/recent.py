"""The `recent` policy: the newest landmarks, in text order, the same in every layer."""

from __future__ import annotations

import torch

from ctxmem.landmarks.policies.base import Selection


class Recent:
    """The `count` newest landmarks, oldest first, so slot order follows text order."""

    name = "recent"
    uses_queries = False

    def select(self, total: int, count: int, layers: int, scores: torch.Tensor | None) -> Selection:
        newest = list(range(max(0, total - count), total))
        return Selection(landmarks=[newest] * layers, chunks=[[] for _ in range(layers)])
