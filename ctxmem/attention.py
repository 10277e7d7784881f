"""ctxmem's attention function, registered with transformers' AttentionInterface as "ctxmem".

It is SDPA with two additions, both active only inside `hooked(hook)`:
- it hands each layer's queries to `hook.observe`, so a landmark policy can score stored
  landmarks against what the model is looking for now;
- it adds `hook.key_bias(layer, kv_length)` to the attention logits of every key, which is how a
  mean landmark entry gets a bias of log(tokens it stands for) and weighs like its chunk.
Outside `hooked`, or with a hook that returns no bias, it is exactly transformers' SDPA.

A hook may also ask for attention statistics: when its `attention_span(layer)` returns a range of
cache entries, the function computes the attention probabilities once more, in float32, and
hands `record_attention` the mass each of those entries received. That costs one extra
[q, kv] logit matrix per head and layer, so it runs only when asked.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Protocol

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "ctxmem"


class AttentionHook(Protocol):
    def observe(self, layer: int, query: torch.Tensor) -> None:
        """Receive one layer's queries [batch, heads, q, head_dim], rotated to their positions."""

    def key_bias(self, layer: int, kv_length: int) -> torch.Tensor | None:
        """Return a bias [kv_length] added to the logits of every query against each key, or None."""

    # Optional, looked up with getattr:
    # attention_span(layer) -> (start, end) | None: cache entries whose attention mass to record;
    # record_attention(layer, mass [end - start]) receives that mass, summed over the forward's
    # queries and averaged over attention heads.


_active: ContextVar[AttentionHook | None] = ContextVar("ctxmem_attention_hook", default=None)


@contextmanager
def hooked(hook: AttentionHook | None) -> Iterator[None]:
    """Route the attention of forwards run inside this block through `hook` (None: plain SDPA)."""
    token = _active.set(hook)
    try:
        yield
    finally:
        _active.reset(token)


def ctxmem_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA, plus query observation and a per-key bias from the active hook."""
    hook = _active.get()
    if hook is not None:
        hook.observe(module.layer_idx, query)
        bias = hook.key_bias(module.layer_idx, key.shape[-2])  # [kv]
        if bias is not None:
            attention_mask = biased_mask(attention_mask, bias, query.shape[-2], query.dtype)
        span_of = getattr(hook, "attention_span", None)
        span = span_of(module.layer_idx) if span_of is not None else None
        if span is not None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            mass = attention_mass(query, key, attention_mask, scaling)  # [kv]
            hook.record_attention(module.layer_idx, mass[span[0]:span[1]])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_mass(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """Return the attention probability each key receives [kv], summed over queries, averaged over heads.

    `query` [batch, heads, q, head_dim] and `key` [batch, kv_heads, kv, head_dim]; query head h
    reads KV head h // (heads / kv_heads), as transformers' repeat_kv lays them out. `mask` is
    what the attention function gets (boolean, additive, or None for plain causal attention).
    Batch entry 0 only, because a stream runs with batch size 1.
    """
    heads, q_length, kv_length = query.shape[1], query.shape[-2], key.shape[-2]
    keys = key[:1].float().repeat_interleave(heads // key.shape[1], dim=1)  # [1, heads, kv, head_dim]
    logits = query[:1].float() @ keys.transpose(-1, -2) * scaling  # [1, heads, q, kv]
    additive = biased_mask(mask[:1] if mask is not None else None,
                           torch.zeros(kv_length, device=key.device), q_length, torch.float32)  # [1, 1, q, kv]
    probabilities = torch.softmax(logits + additive, dim=-1)  # [1, heads, q, kv]
    return probabilities[0].sum(dim=1).mean(dim=0)  # [kv]


def biased_mask(mask: torch.Tensor | None, bias: torch.Tensor, q_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Return an additive mask [batch or 1, 1, q, kv] that is `mask` plus `bias` on every key.

    With no mask the queries are the newest q of the kv entries, attending causally.
    """
    kv_length = bias.shape[-1]
    if mask is None:
        rows = torch.arange(kv_length - q_length, kv_length, device=bias.device)[:, None]  # [q, 1]
        mask = torch.arange(kv_length, device=bias.device)[None] <= rows  # [q, kv], True: attend
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask[..., :kv_length]
    while mask.dim() < 4:
        mask = mask[None]
    return mask + bias.to(mask.dtype)


def install(model: PreTrainedModel) -> None:
    """Register the "ctxmem" attention function and switch `model` to it.

    The SDPA mask function is registered under the same name. Without it transformers builds no
    mask for this attention name, and SDPA then lets a piece fed after cached tokens see only
    the first keys of the cache.

    NOTE: the function runs SDPA, so models that need eager attention features (logit
    softcapping, as in Gemma 2) are refused.
    """
    if getattr(model.config, "attn_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} softcaps its attention logits, which ctxmem's attention "
                         "function (SDPA) cannot do; use the recent policy without --landmark-bias")
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, ctxmem_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
