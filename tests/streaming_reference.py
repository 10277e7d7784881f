"""An independent reference for the streaming cache: the StreamingLLM formulation, written plainly.

It keeps every cached key before RoPE, drops evicted entries by slicing, and on every forward
rotates all cached keys afresh to their in-cache positions 0..n-1, with complex multiplication
rather than ctxmem.rope. No key is ever re-rotated in place, so it shares no arithmetic with the
cache under test.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def complex_rotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply RoPE by `positions` [seq] to `keys` [batch, kv_heads, seq, head_dim], "half" layout."""
    half = inv_freq.numel()
    rotary = keys[..., :2 * half].double()
    pairs = torch.complex(rotary[..., :half], rotary[..., half:])  # [batch, kv_heads, seq, half]
    turn = torch.polar(torch.ones(1, dtype=torch.float64), positions.double()[:, None] * inv_freq.double())
    turned = pairs * turn  # [batch, kv_heads, seq, half]
    out = torch.cat((turned.real, turned.imag, keys[..., 2 * half:].double()), dim=-1)
    return out.to(keys.dtype)


class RawKeyLayer(CacheLayerMixin):
    """Keys stored without RoPE [batch, kv_heads, seq, head_dim], rotated afresh on every read."""

    is_sliding = False

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.inv_freq = inv_freq

    def lazy_initialization(self, key_states, value_states) -> None:
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, count = self.keys.shape[-2], key_states.shape[-2]
        raw = complex_rotate(key_states, -torch.arange(length, length + count), self.inv_freq)
        self.keys = torch.cat((self.keys, raw), dim=-2)
        self.values = torch.cat((self.values, value_states), dim=-2)
        positions = torch.arange(self.keys.shape[-2])
        return complex_rotate(self.keys, positions, self.inv_freq), self.values

    def drop(self, start: int, count: int) -> None:
        keep = torch.cat((torch.arange(start), torch.arange(start + count, self.keys.shape[-2])))
        self.keys, self.values = self.keys[:, :, keep], self.values[:, :, keep]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1


class RawKeyCache(Cache):
    """Sinks plus a window of `window` tokens. When it is full, the oldest `chunk` window tokens go."""

    def __init__(self, num_layers: int, inv_freq: torch.Tensor, sinks: int, window: int, chunk: int):
        super().__init__(layers=[RawKeyLayer(inv_freq) for _ in range(num_layers)])
        self.sinks, self.window, self.chunk = sinks, window, chunk

    def feed_token(self, model, token: int) -> torch.Tensor:
        """Feed one token (evicting a chunk first when the window is full) and return its logits [vocab]."""
        length = self.get_seq_length()
        if length == self.sinks + self.window:
            for layer in self.layers:
                layer.drop(self.sinks, self.chunk)
            length -= self.chunk
        positions = torch.tensor([[length]])
        return model(torch.tensor([[token]]), cache=self, position_ids=positions, use_cache=True).logits[0, -1]
