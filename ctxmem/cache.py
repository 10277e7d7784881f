"""A bounded KV cache for transformers decoder models: attention sinks plus a sliding window.

Layout of every layer's buffer, `capacity` entries long:

    [ sinks | landmark slots | window ]

Invariant: every cached key is rotated to its own index in the buffer, and new tokens take the
next indices, so RoPE positions stay in [0, capacity) however long the stream runs. When the
next input would overflow, whole chunks leave the oldest end of the window and the keys after
them are re-rotated back by the number of evicted tokens (the StreamingLLM scheme).

NOTE: landmark slots are not built yet. Today the buffer is [pinned | window], where the pinned
part is the first `pinned` entries.
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
    is_croppable = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.device = key_states.device
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
                "evict before feeding (StreamingCache.make_room)"
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

    def evict(self, start: int, count: int, spec: RotarySpec) -> None:
        """Drop entries [start, start + count) and move the later ones down, re-rotated by -count."""
        end = self.length
        if count <= 0 or not self.is_initialized:
            return
        moved_keys = self.keys[:, :, start + count:end].clone()  # [batch, kv_heads, moved, head_dim]
        shift = torch.full((moved_keys.shape[-2],), -count, device=self.device)
        self.keys[:, :, start:end - count] = rotate(moved_keys, shift, spec)
        self.values[:, :, start:end - count] = self.values[:, :, start + count:end].clone()
        self.length = end - count


class StreamingCache(Cache):
    """The per-session cache: one StreamingLayer per decoder layer, sharing one layout.

    `pinned` is the number of leading entries never evicted (the sinks, or the whole system
    message). Eviction takes whole `chunk`-sized blocks from the window after them.
    """

    def __init__(self, num_layers: int, capacity: int, pinned: int, chunk: int, spec: RotarySpec):
        if not 0 <= pinned < capacity:
            raise ValueError(f"invalid pinned region {pinned} for capacity {capacity}; use 0 <= pinned < capacity")
        super().__init__(layers=[StreamingLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity
        self.pinned = pinned
        self.chunk = chunk
        self.spec = spec
        self.evicted_tokens = 0
        self.eviction_events = 0

    @property
    def length(self) -> int:
        return self.layers[0].length

    def make_room(self, incoming: int) -> int:
        """Evict whole chunks from the oldest end of the window until `incoming` entries fit.

        Returns the number of evicted entries. Raises ValueError if `incoming` cannot fit even
        with the window empty.
        """
        free = self.capacity - self.length
        if incoming <= free:
            return 0
        window = self.length - self.pinned
        if incoming > self.capacity - self.pinned:
            raise ValueError(f"input of {incoming} tokens cannot fit beside {self.pinned} pinned entries "
                             f"in capacity {self.capacity}; feed it in smaller pieces")
        chunks = -(-(incoming - free) // self.chunk)  # ceiling division
        count = min(chunks * self.chunk, window)
        for layer in self.layers:
            layer.evict(self.pinned, count, self.spec)
        self.evicted_tokens += count
        self.eviction_events += 1
        logger.debug("evicted %d entries after the %d pinned ones; %d remain", count, self.pinned, self.length)
        return count

    def positions(self, count: int, device: torch.device | None = None) -> torch.Tensor:
        """Return the positions of the next `count` tokens: the next indices in the cache [1, count]."""
        return torch.arange(self.length, self.length + count, device=device)[None]
