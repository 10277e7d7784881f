"""A bounded KV cache for transformers decoder models: attention sinks, landmark slots, a window.

Layout of every layer's buffer, `capacity = pinned + landmark_slots + retrieval_slots + window`
entries long:

    [ pinned (sinks or the system message) | landmark slots | retrieval region | window ]

Invariant: every cached key is rotated to its own index in the buffer, and new tokens take the
next indices, so RoPE positions stay in [0, capacity) however long the stream runs. When the
next input would overflow the window, whole chunks leave its oldest end and the keys after them
are re-rotated back by the number of evicted tokens (the StreamingLLM scheme, arXiv 2309.17453).
Landmark entries and retrieved chunks arrive un-rotated and are rotated to their slot index
when placed; placing more or fewer of them moves the window, re-rotated by the change.
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ctxmem.rope import RotarySpec, rotate

logger = logging.getLogger(__name__)


class StreamingLayer(CacheLayerMixin):
    """One layer's preallocated keys and values [batch, kv_heads, capacity, head_dim].

    `update` writes new entries in place after the used ones and returns views of the used
    part; nothing is concatenated per token.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(batch, kv_heads, self.capacity, head_dim)
        self.values = value_states.new_zeros(batch, kv_heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        if self.length + count > self.capacity:
            raise RuntimeError(
                f"cache overflow: {self.length} entries + {count} new > capacity {self.capacity}; "
                "call StreamingCache.make_room before each forward"
            )
        self.keys[:, :, self.length:self.length + count] = key_states
        self.values[:, :, self.length:self.length + count] = value_states
        self.length += count
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0

    def move(self, start: int, end: int, to: int, spec: RotarySpec) -> None:
        """Move entries [start, end) to begin at `to`, keys re-rotated by `to - start`."""
        if not self.is_initialized or end <= start or to == start:
            return
        count = end - start
        shift = torch.full((count,), to - start, device=self.device)
        moved_keys = rotate(self.keys[:, :, start:end], shift, spec)  # [batch, kv_heads, count, head_dim], a copy
        moved_values = self.values[:, :, start:end].clone()
        self.keys[:, :, to:to + count] = moved_keys
        self.values[:, :, to:to + count] = moved_values

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write `keys`, `values` [batch, kv_heads, n, head_dim] at [start, start + n)."""
        count = keys.shape[-2]
        self.keys[:, :, start:start + count] = keys.to(self.dtype)
        self.values[:, :, start:start + count] = values.to(self.dtype)


class StreamingCache(Cache):
    """The per-session cache: one StreamingLayer per decoder layer, sharing one layout.

    Parameters: `pinned` leading entries are never evicted (the attention sinks, or the whole
    system message); `landmark_slots` entries after them hold landmarks and `retrieval_slots`
    entries hold restored chunks (both empty until placed); the `window` most recent tokens follow. Eviction takes whole `chunk`-token blocks from the
    oldest end of the window, so a chat template's structure is never split inside the pinned
    region. `spec` is the model's rotation (see ctxmem.rope.rotary_spec).
    """

    def __init__(self, num_layers: int, spec: RotarySpec, pinned: int, window: int, chunk: int,
                 landmark_slots: int = 0, retrieval_slots: int = 0):
        if min(pinned, landmark_slots, retrieval_slots) < 0:
            raise ValueError(f"pinned ({pinned}), landmark_slots ({landmark_slots}) and retrieval_slots "
                             f"({retrieval_slots}) must be >= 0")
        if not 1 <= chunk <= window:
            raise ValueError(f"chunk must be between 1 and the window ({window}), got {chunk}; lower the chunk size")
        self.capacity = pinned + landmark_slots + retrieval_slots + window
        super().__init__(layers=[StreamingLayer(self.capacity) for _ in range(num_layers)])
        self.spec = spec
        self.pinned = pinned
        self.landmark_slots = landmark_slots
        self.retrieval_slots = retrieval_slots
        self.window = window
        self.chunk = chunk
        self.landmarks = 0  # landmark slots in use
        self.retrieved = 0  # retrieval slots in use
        self.evicted_tokens = 0
        self.eviction_events = 0

    @property
    def length(self) -> int:
        """Entries in use: pinned + landmarks + retrieved + window tokens."""
        return self.layers[0].length

    @property
    def window_start(self) -> int:
        return self.pinned + self.landmarks + self.retrieved

    @property
    def window_length(self) -> int:
        return max(0, self.length - self.window_start)

    def room(self) -> int:
        """Return how many tokens the next forward may bring without an eviction."""
        if self.length < self.pinned:
            return self.pinned - self.length
        return self.window - self.window_length

    def make_room(self, incoming: int) -> int:
        """Evict whole chunks from the oldest end of the window until `incoming` tokens fit.

        Returns the number of evicted tokens.
        """
        count = self.eviction_size(incoming)
        if count:
            self.evict(count)
        return count

    def eviction_size(self, incoming: int) -> int:
        """Return how many window tokens must go (whole chunks) before `incoming` tokens fit.

        Input that fills the pinned region must not spill into the window in the same forward:
        feed the pinned tokens first.
        """
        if self.length < self.pinned:
            if incoming > self.pinned - self.length:
                raise ValueError(f"input of {incoming} tokens crosses the end of the pinned region "
                                 f"({self.pinned - self.length} entries left); feed the pinned tokens alone first")
            return 0
        if incoming > self.window:
            raise ValueError(f"input of {incoming} tokens exceeds the window of {self.window}; "
                             "feed it in pieces of at most one chunk (ctxmem.stream.Stream.feed does)")
        overflow = self.window_length + incoming - self.window
        if overflow <= 0:
            return 0
        return min(-(-overflow // self.chunk) * self.chunk, self.window_length)  # whole chunks

    def window_entries(self, count: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `count` window entries from `offset`, keys without RoPE: [layers, kv_heads, count, head_dim].

        Batch entry 0 only (a stream runs with batch size 1).
        """
        return self.entries(self.window_start + offset, count)

    def entries(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return entries [start, start + count), keys without RoPE: [layers, kv_heads, count, head_dim]."""
        positions = torch.arange(start, start + count)
        keys = torch.stack([rotate(layer.keys[0, :, start:start + count], -positions, self.spec)
                            for layer in self.layers])
        values = torch.stack([layer.values[0, :, start:start + count].clone() for layer in self.layers])
        return keys, values

    def append_entries(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append un-rotated entries [layers, kv_heads, n, head_dim] after the used ones, rotated to their indices.

        This is how a saved session is loaded back: pinned entries first, then (after
        `place_landmarks`) the window.
        """
        count = keys.shape[-2]
        if self.length + count > self.capacity:
            raise ValueError(f"{count} entries do not fit after {self.length} of {self.capacity}")
        positions = torch.arange(self.length, self.length + count)
        for layer, layer_keys, layer_values in zip(self.layers, keys, values):
            if not layer.is_initialized:
                layer.lazy_initialization(layer_keys[None], layer_values[None])
            start = layer.length
            layer.write(start, rotate(layer_keys[None].to(layer.device), positions, self.spec), layer_values[None])
            layer.length = start + count

    def evict(self, count: int) -> None:
        """Drop the `count` oldest window tokens and move later keys down, re-rotated by -count."""
        start, end = self.window_start, self.length
        for layer in self.layers:
            layer.move(start + count, end, start, self.spec)
            layer.length = end - count
        self.evicted_tokens += count
        self.eviction_events += 1
        logger.debug("evicted %d window tokens; %d of %d entries in use", count, self.length, self.capacity)

    def place_landmarks(self, keys: list[torch.Tensor], values: list[torch.Tensor], retrieved: int = 0) -> None:
        """Replace the memory entries with `keys`, `values`: per layer [batch, kv_heads, n, head_dim].

        The first n - `retrieved` entries are landmarks, the last `retrieved` are restored chunk
        tokens. Keys come without RoPE and are rotated to their indices pinned..pinned+n-1. The
        window moves to start right after them, its keys re-rotated by the change.
        """
        count = keys[0].shape[-2]
        if count - retrieved > self.landmark_slots or retrieved > self.retrieval_slots:
            raise ValueError(f"{count - retrieved} landmarks and {retrieved} retrieved entries exceed the "
                             f"{self.landmark_slots} landmark and {self.retrieval_slots} retrieval slots; "
                             "select fewer or configure more slots")
        if self.length < self.pinned:
            raise ValueError("landmarks can only be placed once the pinned region is full")
        start, end, shift = self.window_start, self.length, count - self.landmarks - self.retrieved
        slots = torch.arange(self.pinned, self.pinned + count)
        for layer, layer_keys, layer_values in zip(self.layers, keys, values):
            layer.move(start, end, start + shift, self.spec)
            layer.write(self.pinned, rotate(layer_keys, slots, self.spec), layer_values)
            layer.length = end + shift
        self.landmarks, self.retrieved = count - retrieved, retrieved

    def rollback(self, count: int) -> None:
        """Forget the `count` newest window entries, so that they can be encoded again."""
        if not 0 <= count <= self.window_length:
            raise ValueError(f"cannot roll back {count} entries of a window holding {self.window_length}")
        for layer in self.layers:
            layer.length -= count

    def positions(self, count: int, device: torch.device | None = None) -> torch.Tensor:
        """Return the positions of the next `count` tokens: their indices in the cache [1, count]."""
        return torch.arange(self.length, self.length + count, device=device)[None]
