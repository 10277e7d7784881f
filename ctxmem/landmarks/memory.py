"""A stream's landmark memory: builds a landmark per evicted chunk, keeps it, places a selection.

`LandmarkMemory.add` turns one evicted chunk into a landmark (recomputed over [sinks + chunk],
or taken from the window KV at eviction time), writes it to the landmark store when one is
given, and keeps the chunk's full KV when the `retrieve` policy may restore it. `placement`
returns the selected landmarks and restored chunks in the layout `StreamingCache.place_landmarks`
takes. The memory is also the attention hook of its stream (see ctxmem.attention): it logs the
latest queries for the policies that score landmarks, and biases landmark entries by log(count).
With `LandmarkConfig.attention_stats` it also counts each landmark's placements and the attention
mass it receives, and `flush_usage` adds those counts to the store's usage hash.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import PreTrainedModel

from ctxmem.config import LandmarkConfig
from ctxmem.fingerprint import model_fingerprint
from ctxmem.landmarks.builder import compress, encode_chunk
from ctxmem.landmarks.policies import Selection, make_policy
from ctxmem.landmarks.scoring import QueryLog, score
from ctxmem.rope import RotarySpec
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.records import Chunk, Landmark
from ctxmem.store.usage import LandmarkUsage, UsageStore

logger = logging.getLogger(__name__)

Placement = tuple[list[torch.Tensor], list[torch.Tensor], int]  # per-layer keys, values; retrieved entries


class LandmarkMemory:
    """Landmarks of one stream, oldest first; optionally persisted under `session_id` in `store`.

    `slots` is the cache's landmark slot count; each landmark takes `config.centroids` of them.
    `decode` turns token ids into the source text kept in each record.

    NOTE: every landmark, and with `retrieve` every chunk's full KV, stays in host memory for
    the life of the stream, so memory grows with the text (about 64 KB per 32-token chunk on
    the reference model, megabytes on 1B-class models). Reading chunks back from the store on
    demand would bound it; that is not built.
    """

    def __init__(self, model: PreTrainedModel, spec: RotarySpec, config: LandmarkConfig, slots: int,
                 store: LandmarkStore | None = None, session_id: str = "stream",
                 decode: Callable[[list[int]], str] | None = None):
        if slots < config.centroids and config.policy != "retrieve":
            raise ValueError(f"{slots} landmark slots cannot hold one landmark of {config.centroids} centroids; "
                             "raise landmark_slots (--landmarks L) or lower centroids")
        self.model, self.spec, self.config = model, spec, config
        self.capacity = slots // config.centroids  # landmarks placed at once
        self.policy = make_policy(config.policy, config.retrieve)
        self.store, self.session_id = store, session_id
        self.decode = decode or (lambda ids: "")
        self.fingerprint = model_fingerprint(model)
        self.landmarks: list[Landmark] = []
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # full un-rotated KV, kept for `retrieve`
        self.store_chunks = True  # False when a session already stores every chunk (exact resume)
        self.queries = QueryLog(model.config.num_hidden_layers, config.query_tokens)
        self.selection: Selection | None = None
        self._bias: list[torch.Tensor] | None = None  # per layer [capacity]
        self.written = 0
        self.injected = 0
        self.retrieved = 0
        self.usage: dict[int, LandmarkUsage] = {}  # counts not yet added to the store, by landmark index
        self._memory_start = 0  # cache index of the first landmark entry, set by `placement`

    @property
    def hooks_attention(self) -> bool:
        """Whether the stream must run this memory as its attention hook."""
        return self.config.uses_queries or self.config.bias or self.config.attention_stats

    @property
    def needs_window_kv(self) -> bool:
        """Whether `add` needs the evicted chunk's KV from the window."""
        return self.config.source == "window" or self.config.policy == "retrieve"

    def add(self, sink_ids: list[int], chunk_ids: list[int], token_start: int,
            window_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> Landmark:
        """Build the landmark of one evicted chunk; `window_kv` is its un-rotated KV from the window.

        The `retrieve` policy keeps the window KV itself, the exact entries the model computed
        in context, so that a restored chunk is what the cache held before it was evicted.
        """
        index = len(self.landmarks)
        if self.config.policy == "retrieve":
            self._keep_chunk(index, token_start, chunk_ids, *window_kv)
        if self.config.source == "window":
            keys, values = window_kv  # [layers, kv_heads, chunk, head_dim]
        else:
            keys, values = encode_chunk(self.model, self.spec, sink_ids, chunk_ids)
        mean_keys, mean_values = compress(keys, values, self.config.centroids)
        compression = "mean" if self.config.centroids == 1 else f"centroids:{self.config.centroids}"
        landmark = Landmark.from_tensors(
            session_id=self.session_id, index=index, token_start=token_start,
            token_end=token_start + len(chunk_ids), text=self.decode(chunk_ids), fingerprint=self.fingerprint,
            keys=mean_keys.cpu(), values=mean_values.cpu(), compression=compression,
        )
        self.landmarks.append(landmark)
        if self.store is not None:
            status = self.store.put(landmark)
            self.written += status != "pending"
        logger.debug("landmark %d over tokens %d-%d", index, token_start, landmark.record.token_end)
        return landmark

    def _keep_chunk(self, index: int, token_start: int, chunk_ids: list[int], keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """Keep the chunk's full KV for `retrieve`, and store it beside its landmark."""
        keys, values = keys.cpu(), values.cpu()
        self.chunks.append((keys, values))
        if self.store is not None and self.store_chunks:
            self.store.put_chunk(Chunk.from_tensors(
                session_id=self.session_id, index=index, token_start=token_start, fingerprint=self.fingerprint,
                keys=keys, values=values, token_ids=torch.tensor(chunk_ids, dtype=torch.int64)))

    def select(self) -> Selection:
        """Run the policy over the landmarks, with query scores when it uses them."""
        scores = None
        if self.config.uses_queries and self.queries.ready and self.landmarks:
            keys = torch.stack([torch.stack(list(landmark.keys)) for landmark in self.landmarks], dim=1)
            scores = score(self.queries, keys, self.spec)  # [layers, n]; keys [layers, n, kv_heads, entries, head_dim]
        layers = self.model.config.num_hidden_layers
        return self.policy.select(len(self.landmarks), self.capacity, layers, scores)

    def placement(self, device: torch.device, pinned: int, capacity: int,
                  selection: Selection | None = None) -> Placement:
        """Return the selected entries per layer [1, kv_heads, n, head_dim] and the restored count.

        Per layer: the selected landmarks' entries, then the restored chunks' tokens. `pinned`
        is where the memory region starts in a cache of `capacity` entries (for the bias).
        """
        self.selection = selection or self.select()
        keys, values = [], []
        for layer, (chosen, restored) in enumerate(zip(self.selection.landmarks, self.selection.chunks)):
            layer_keys = [self.landmarks[i].keys[layer] for i in chosen] + [self.chunks[i][0][layer] for i in restored]
            layer_values = [self.landmarks[i].values[layer] for i in chosen] + [self.chunks[i][1][layer] for i in restored]
            keys.append(torch.cat(layer_keys, dim=1)[None].to(device))  # [1, kv_heads, n, head_dim]
            values.append(torch.cat(layer_values, dim=1)[None].to(device))
        self.injected = len(self.selection.landmarks[0])
        self._memory_start = pinned
        if self.config.attention_stats:
            for index in set().union(*self.selection.landmarks):
                self.usage.setdefault(index, LandmarkUsage()).injected += 1
        self.retrieved = len(self.selection.chunks[0])
        retrieved_entries = sum(self.chunks[i][0].shape[2] for i in self.selection.chunks[0])
        self._bias = self._log_count_bias(pinned, capacity, device) if self.config.bias else None
        return keys, values, retrieved_entries

    def _log_count_bias(self, pinned: int, capacity: int, device: torch.device) -> list[torch.Tensor]:
        """Per layer [capacity]: log(tokens per entry) on each landmark entry, 0 elsewhere.

        NOTE: a centroid stands for tokens_in_chunk / centroids tokens here, not its cluster's
        actual size, which the record does not keep.
        """
        biases = []
        for chosen in self.selection.landmarks:
            spans = torch.tensor([float(self.landmarks[i].record.token_end - self.landmarks[i].record.token_start)
                                  for i in chosen])
            entries = (spans / self.config.centroids).log().repeat_interleave(self.config.centroids)
            bias = torch.zeros(capacity)
            bias[pinned:pinned + len(entries)] = entries
            biases.append(bias.to(device))
        return biases

    def observe(self, layer: int, query: torch.Tensor) -> None:
        if self.config.uses_queries:
            self.queries.observe(layer, query)

    def key_bias(self, layer: int, kv_length: int) -> torch.Tensor | None:
        """Return the log-count bias of the first `kv_length` cache entries, or None without landmarks."""
        return None if self._bias is None else self._bias[layer][:kv_length]

    # Attention statistics (LandmarkConfig.attention_stats), called by the attention function

    def attention_span(self, layer: int) -> tuple[int, int] | None:
        """Return the cache entries [start, end) of the landmarks placed in `layer`, or None."""
        if not self.config.attention_stats or self.selection is None or not self.selection.landmarks[layer]:
            return None
        count = len(self.selection.landmarks[layer]) * self.config.centroids
        return self._memory_start, self._memory_start + count

    def record_attention(self, layer: int, mass: torch.Tensor) -> None:
        """Add one layer's attention `mass` [entries] to the landmarks placed there.

        A landmark's mass is summed over its entries and over the forward's queries, averaged
        over heads and over all layers, so a landmark that took all the attention of one query
        in every layer gains 1.0.

        NOTE: a prompt piece that `Stream.refresh` encodes again is counted twice.
        """
        chosen = self.selection.landmarks[layer]
        layers = self.model.config.num_hidden_layers
        per_landmark = mass.float().reshape(len(chosen), self.config.centroids).sum(-1) / layers  # [landmarks]
        for index, value in zip(chosen, per_landmark.tolist()):
            self.usage.setdefault(index, LandmarkUsage()).mass += value

    def flush_usage(self) -> None:
        """Add the counts gathered since the last flush to the store's usage hash, then forget them.

        Without a store the counts stay in `usage`. When Redis is unreachable they stay too, with
        a warning, and the next flush sends them.

        NOTE: counts are added outside a session's commit, so a turn that fails after a flush
        leaves its counts in Redis.
        """
        if not self.usage or self.store is None:
            return
        usage_store = UsageStore(self.store.client, self.store.keys, self.store.ttl_seconds)
        try:
            usage_store.add(self.session_id, self.usage)
        except ConnectionError as error:
            logger.warning("kept the usage counts of %d landmarks in memory: %s", len(self.usage), error)
            return
        self.usage = {}
