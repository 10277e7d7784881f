"""Perplexity of a long text under five ways of holding context, for `ctxmem eval ppl`.

- `dense`: full attention over everything, absolute positions (fails past the trained length);
- `window`: the last `window` tokens, absolute positions, no sinks (the naive baseline);
- `streaming`: ctxmem's cache, sinks plus a re-rotated window;
- `recompute`: each chunk encoded afresh over [sinks | the tokens before it in the window]
  at positions 0.., the quality oracle that streaming approximates at a fraction of the cost;
- `landmarks`: streaming with a landmark memory filling the cache's landmark slots.
Every method scores each token after the first exactly once, so their losses line up.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from transformers import DynamicCache, PreTrainedModel

from ctxmem.cache import StreamingCache
from ctxmem.config import PERPLEXITY_METHODS as METHODS, CacheConfig, LandmarkConfig
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.rope import rotary_spec
from ctxmem.rope_scaling import max_cache_positions
from ctxmem.stream import Stream

logger = logging.getLogger(__name__)

BUCKET = 1024
Progress = Callable[[int], None]  # called with the number of tokens just scored


class Bucket(BaseModel):
    start: int
    end: int
    perplexity: float


class PerplexityResult(BaseModel):
    method: str
    tokens: int
    perplexity: float
    buckets: list[Bucket]


def evaluate(model: PreTrainedModel, ids: list[int], method: str, config: CacheConfig,
             progress: Progress | None = None, landmarks: LandmarkConfig | None = None) -> PerplexityResult:
    """Score `ids` under `method`, overall and in buckets of 1,024 tokens."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    progress = progress or (lambda n: None)
    if method == "landmarks":
        if config.landmark_slots == 0 and config.retrieval_slots == 0:
            raise ValueError("method 'landmarks' needs landmark slots; pass --landmarks L (1 or more), "
                             "or --landmark-policy retrieve with --retrieve K")
        memory = LandmarkMemory(model, rotary_spec(model), landmarks or LandmarkConfig(), config.landmark_slots)
        return summarize(method, streaming_nll(model, ids, config, progress, Stream(model, config, memory=memory)))
    scorer = {"dense": dense_nll, "window": window_nll, "streaming": streaming_nll, "recompute": recompute_nll}
    nll = scorer[method](model, ids, config, progress)  # [len(ids) - 1]
    return summarize(method, nll)


def summarize(method: str, nll: torch.Tensor) -> PerplexityResult:
    """Return the perplexity overall and per bucket, where nll[i] is the loss of token i + 1."""
    buckets = []
    for start in range(0, nll.numel(), BUCKET):
        part = nll[start:start + BUCKET]
        buckets.append(Bucket(start=start + 1, end=start + 1 + part.numel(), perplexity=math.exp(part.mean().item())))
    return PerplexityResult(method=method, tokens=nll.numel() + 1, perplexity=math.exp(nll.mean().item()),
                            buckets=buckets)


def streaming_nll(model: PreTrainedModel, ids: list[int], config: CacheConfig, progress: Progress,
                  stream: Stream | None = None) -> torch.Tensor:
    stream = stream or Stream(model, config)
    losses = []
    for start in range(0, len(ids), BUCKET):
        losses.append(stream.feed(ids[start:start + BUCKET], score=True).nll)
        progress(min(BUCKET, len(ids) - start))
    return torch.cat(losses)


class AbsoluteWindowCache(StreamingCache):
    """Cache of the naive sliding window: evicted tokens leave, and kept keys keep their absolute positions."""

    def evict(self, count: int) -> None:
        start, end = self.window_start, self.length
        for layer in self.layers:
            layer.keys[:, :, start:end - count] = layer.keys[:, :, start + count:end].clone()
            layer.values[:, :, start:end - count] = layer.values[:, :, start + count:end].clone()
            layer.length = end - count
        self.evicted_tokens += count
        self.eviction_events += 1

    def positions(self, count: int, device: torch.device | None = None) -> torch.Tensor:
        first = self.length + self.evicted_tokens
        return torch.arange(first, first + count, device=device)[None]


def window_nll(model: PreTrainedModel, ids: list[int], config: CacheConfig, progress: Progress) -> torch.Tensor:
    stream = Stream(model, CacheConfig(sinks=0, window=config.window, chunk=config.chunk))
    baseline = stream.cache
    stream.cache = AbsoluteWindowCache(len(baseline.layers), baseline.spec, pinned=0, window=baseline.window,
                                       chunk=baseline.chunk)
    return streaming_nll(model, ids, config, progress, stream)


@torch.no_grad()
def dense_nll(model: PreTrainedModel, ids: list[int], config: CacheConfig, progress: Progress) -> torch.Tensor:
    """Full attention over the whole text, fed in pieces of 512 tokens into a growing cache."""
    cache, losses, previous = DynamicCache(config=model.config), [], None
    for start in range(0, len(ids), 512):
        piece = torch.tensor([ids[start:start + 512]], device=model.device)  # [1, piece]
        logits = model(input_ids=piece, cache=cache, use_cache=True).logits[0].float()  # [piece, vocab]
        losses.append(_shifted_nll(previous, logits, piece[0]))
        previous = logits[-1]
        progress(piece.shape[-1])
    return torch.cat(losses)


@torch.no_grad()
def recompute_nll(model: PreTrainedModel, ids: list[int], config: CacheConfig, progress: Progress) -> torch.Tensor:
    """Encode each chunk afresh after the sinks and up to `window - chunk` tokens before it."""
    sinks = config.sinks if isinstance(config.sinks, int) else 4
    window = config.window_for(sinks, max_cache_positions(model.config))
    context = window - config.chunk
    losses = []
    for start in range(0, len(ids), config.chunk):
        end = min(start + config.chunk, len(ids))
        before = ids[max(sinks, start - context):start] if start > sinks else ids[:start]
        prefix = (ids[:sinks] if start > sinks else []) + before
        row = torch.tensor([prefix + ids[start:end]], device=model.device)  # [1, prefix + chunk]
        logits = model(input_ids=row).logits[0].float()  # positions 0.. of the fresh forward
        scored = logits[len(prefix) - 1:-1] if prefix else logits[:-1]
        targets = row[0, len(prefix):] if prefix else row[0, 1:]
        losses.append(F.cross_entropy(scored, targets, reduction="none").cpu())
        progress(end - start)
    return torch.cat(losses)


def _shifted_nll(previous: torch.Tensor | None, logits: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """Loss of each token of `piece` given the logits before it ([piece] or, at the start, [piece - 1])."""
    if previous is not None:
        return F.cross_entropy(torch.cat((previous[None], logits[:-1])), piece, reduction="none").cpu()
    return F.cross_entropy(logits[:-1], piece[1:], reduction="none").cpu()
