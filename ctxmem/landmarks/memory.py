"""A stream's landmark memory: builds a landmark per evicted chunk, keeps it, places a selection.

`LandmarkMemory.add` turns one evicted chunk into a landmark (recomputed over [sinks + chunk],
or taken from the window KV at eviction time), writes it to the landmark store when one is
given, and `placement` returns the keys and values of the selected landmarks in the layout
`StreamingCache.place_landmarks` takes.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import PreTrainedModel

from ctxmem.config import LandmarkConfig
from ctxmem.fingerprint import model_fingerprint
from ctxmem.landmarks.builder import compress, encode_chunk
from ctxmem.landmarks.policies import make_policy
from ctxmem.rope import RotarySpec
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.records import Landmark

logger = logging.getLogger(__name__)


class LandmarkMemory:
    """Landmarks of one stream, oldest first; optionally persisted under `session_id` in `store`.

    `slots` is the cache's landmark slot count; each landmark takes `config.centroids` of them.
    `decode` turns token ids into the source text kept in each record.
    """

    def __init__(self, model: PreTrainedModel, spec: RotarySpec, config: LandmarkConfig, slots: int,
                 store: LandmarkStore | None = None, session_id: str = "stream",
                 decode: Callable[[list[int]], str] | None = None):
        if slots < config.centroids:
            raise ValueError(f"{slots} landmark slots cannot hold one landmark of {config.centroids} centroids; "
                             "raise landmark_slots or lower centroids")
        self.model, self.spec, self.config = model, spec, config
        self.capacity = slots // config.centroids  # landmarks placed at once
        self.policy = make_policy(config.policy)
        self.store, self.session_id = store, session_id
        self.decode = decode or (lambda ids: "")
        self.fingerprint = model_fingerprint(model)
        self.landmarks: list[Landmark] = []
        self.written = 0
        self.injected = 0

    def add(self, sink_ids: list[int], chunk_ids: list[int], token_start: int,
            window_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> Landmark:
        """Build the landmark of one evicted chunk; `window_kv` is its un-rotated KV from the window."""
        if self.config.source == "window" and window_kv is not None:
            keys, values = window_kv  # [layers, kv_heads, chunk, head_dim]
        else:
            keys, values = encode_chunk(self.model, self.spec, sink_ids, chunk_ids)
        keys, values = compress(keys, values, self.config.centroids)
        compression = "mean" if self.config.centroids == 1 else f"centroids:{self.config.centroids}"
        landmark = Landmark.from_tensors(
            session_id=self.session_id, index=len(self.landmarks), token_start=token_start,
            token_end=token_start + len(chunk_ids), text=self.decode(chunk_ids), fingerprint=self.fingerprint,
            keys=keys.cpu(), values=values.cpu(), compression=compression,
        )
        self.landmarks.append(landmark)
        if self.store is not None:
            status = self.store.put(landmark)
            self.written += status != "pending"
        logger.debug("landmark %d over tokens %d-%d", landmark.record.index, token_start, landmark.record.token_end)
        return landmark

    def placement(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return the selected landmarks' keys and values, per layer [1, kv_heads, n, head_dim]."""
        chosen = [self.landmarks[i] for i in self.policy.select(self.landmarks, self.capacity)]
        self.injected = len(chosen)
        keys = torch.cat([landmark.keys for landmark in chosen], dim=2).to(device)  # [layers, kv_heads, n, head_dim]
        values = torch.cat([landmark.values for landmark in chosen], dim=2).to(device)
        return [layer[None] for layer in keys], [layer[None] for layer in values]
