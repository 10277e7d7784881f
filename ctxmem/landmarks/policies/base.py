"""The interface every landmark policy implements, and the selection it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Selection:
    """The contents of the cache's memory region, per layer, as indices into the stream's landmarks.

    `landmarks[layer]` fill the landmark slots in slot order; `chunks[layer]` are the chunks
    restored whole into the retrieval region. Every layer selects the same number of each,
    because all layers share one cache layout.
    """

    landmarks: list[list[int]]
    chunks: list[list[int]]


class Policy(Protocol):
    name: str
    uses_queries: bool

    def select(self, total: int, count: int, layers: int, scores: torch.Tensor | None) -> Selection:
        """Choose among `total` landmarks (oldest first) up to `count` per layer for the slots.

        `scores` [layers, total] rate each landmark against the latest queries (higher: more
        relevant); None before any query was seen or when the policy does not use them.
        """


def best(scores: torch.Tensor, count: int, exclude: set[int] = frozenset()) -> list[int]:
    """Return the indices of the `count` highest `scores` [n] outside `exclude`, in ascending order."""
    candidates = [index for index in scores.argsort(descending=True).tolist() if index not in exclude]
    return sorted(candidates[:count])
