"""Feed an unbounded token stream through a model with the bounded cache, and generate from it.

`Stream.feed` prefills in pieces of at most one chunk and never more than the cache has room
for, evicting a chunk only when the cache is full. Every token therefore sees exactly the
context it would see if the stream were fed one token at a time, and the memory held is the
cache capacity plus one piece, whatever the input length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ctxmem.attention import hooked, install
from ctxmem.cache import StreamingCache
from ctxmem.config import SYSTEM_SINKS, CacheConfig
from ctxmem.generation import check_sampling
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.rope import rotary_spec
from ctxmem.rope_scaling import max_cache_positions

from ctxmem.saturation import Saturation

logger = logging.getLogger(__name__)


@dataclass
class FeedResult:
    """The result of one `Stream.feed` call.

    `next_logits` [vocab] predicts the token after the input. `nll` [n] holds, when scoring was
    asked, the negative log-likelihood of each input token that had a prediction (every token
    but the first of the whole stream).
    """

    next_logits: torch.Tensor
    nll: torch.Tensor | None = None


class Stream:
    """One token stream over a model with a StreamingCache: feed, score, generate, saturation.

    With `sinks="system"` the cache is built by `pin(ids)`, which pins exactly those tokens
    (the rendered system message); otherwise it is built at once with `sinks` pinned tokens.
    `on_saturation` is called with a Saturation after every feed and every generated token.
    With a `memory`, every evicted chunk becomes a landmark and the memory's selection fills
    the cache's landmark slots (and, with `retrieve`, its retrieval region). Policies that score
    landmarks against queries re-select at each eviction and, via `refresh`, before a reply.
    """

    def __init__(self, model: PreTrainedModel, config: CacheConfig | None = None,
                 on_saturation: Callable[[Saturation], None] | None = None, memory: LandmarkMemory | None = None):
        self.model = model
        self.config = config or CacheConfig()
        if memory is not None:
            check_memory_fits(memory, self.config)
            if memory.hooks_attention:
                install(model)
        self.on_saturation = on_saturation
        self.memory = memory
        self.spec = rotary_spec(model)
        self.max_positions = max_cache_positions(model.config)
        self.tokens_seen = 0
        self.peak_entries = 0
        self.cache: StreamingCache | None = None
        self._next_logits: torch.Tensor | None = None  # [vocab]
        self.pinned_ids: list[int] = []
        self.window_ids: list[int] = []  # token ids of the window, oldest first
        self._last_piece: list[int] = []
        # Called with (index, token ids, keys without RoPE, values) for each completed window chunk,
        # in order, once: at its eviction or when `emit_chunks` is called (a session's exact save).
        self.on_chunk: Callable[[int, list[int], torch.Tensor, torch.Tensor], None] | None = None
        self.chunks_emitted = 0
        if self.config.sinks != SYSTEM_SINKS:
            self.cache = self._build_cache(self.config.sinks)

    def _build_cache(self, pinned: int) -> StreamingCache:
        window = self.config.window_for(pinned, self.max_positions)
        logger.debug("cache: %d pinned + %d landmark slots + window %d, chunk %d",
                     pinned, self.config.landmark_slots, window, self.config.chunk)
        return StreamingCache(self.model.config.num_hidden_layers, self.spec, pinned=pinned, window=window,
                              chunk=self.config.chunk, landmark_slots=self.config.landmark_slots,
                              retrieval_slots=self.config.retrieval_slots)

    def pin(self, ids: list[int], score: bool = False) -> FeedResult:
        """Start the stream with `ids` pinned forever (sinks="system"): the cache is sized here."""
        if self.cache is not None:
            raise ValueError(f"the stream already has {self.cache.pinned} pinned tokens; "
                             "pin() is for sinks='system' and must come first")
        if not ids:
            raise ValueError("cannot pin an empty system message; use sinks=4 when there is none")
        self.cache = self._build_cache(len(ids))
        return self.feed(ids, score=score)

    @torch.no_grad()
    def feed(self, ids: list[int], score: bool = False) -> FeedResult:
        """Encode `ids` into the cache, and with `score` also return each token's loss."""
        if self.cache is None:
            raise ValueError("sinks='system' needs the system message first: call pin(ids) before feed")
        if not ids:
            raise ValueError("feed() got no tokens")
        losses = []
        start = 0
        while start < len(ids):
            if self.cache.room() == 0:
                self._evict()
            piece = ids[start:start + min(self.cache.room(), self.config.chunk)]
            pinning = self.cache.length < self.cache.pinned
            logits = self._forward(piece, all_logits=score)  # [piece or 1, vocab]
            if pinning:
                self.pinned_ids.extend(piece)
            else:
                self.window_ids.extend(piece)
            self.peak_entries = max(self.peak_entries, self.cache.length)
            if score:
                losses.append(self._piece_nll(piece, logits))
            self._next_logits = logits[-1]
            self._last_piece = [] if pinning else piece
            start += len(piece)

        self.tokens_seen += len(ids)
        self._report()
        return FeedResult(self._next_logits, torch.cat(losses) if score else None)

    def _evict(self) -> None:
        """Evict one chunk from the full window; with a memory, turn it into a landmark and re-place."""
        cache = self.cache
        count = cache.eviction_size(1)
        wants_window_kv = self.memory is not None and self.memory.needs_window_kv
        window_kv = cache.window_entries(count) if wants_window_kv else None
        token_start = cache.pinned + cache.evicted_tokens
        self.emit_chunks(cache.evicted_tokens + count)
        cache.evict(count)
        evicted, self.window_ids = self.window_ids[:count], self.window_ids[count:]
        if self.memory is None:
            return
        self.memory.add(self.pinned_ids, evicted, token_start, window_kv)
        self._place()

    def emit_chunks(self, limit: int | None = None) -> None:
        """Pass every completed window chunk ending at or before window token `limit` to `on_chunk`.

        Window tokens are counted from the first token after the pinned ones; chunk k holds
        tokens [k * chunk, (k + 1) * chunk). `limit` None means all tokens seen so far.
        """
        cache, size = self.cache, self.config.chunk
        if self.on_chunk is None or cache is None:
            return
        limit = cache.evicted_tokens + cache.window_length if limit is None else limit
        while (self.chunks_emitted + 1) * size <= limit:
            offset = self.chunks_emitted * size - cache.evicted_tokens  # in the window
            keys, values = cache.window_entries(size, offset)  # [layers, kv_heads, chunk, head_dim]
            self.on_chunk(self.chunks_emitted, self.window_ids[offset:offset + size], keys, values)
            self.chunks_emitted += 1

    def _place(self, selection=None) -> None:
        cache = self.cache
        cache.place_landmarks(*self.memory.placement(self.model.device, cache.pinned, cache.capacity, selection))

    @torch.no_grad()
    def refresh(self) -> bool:
        """Re-select landmarks with the queries of the last piece fed, and encode it again if they changed.

        Generation calls this after the prompt, so a reply starts from the landmarks (or restored
        chunks) that match the question rather than those chosen at the last eviction. Returns
        whether the selection changed.
        """
        memory, piece = self.memory, self._last_piece
        if memory is None or not memory.config.uses_queries or not memory.landmarks or len(piece) < 2:
            return False
        selection = memory.select()
        if selection == memory.selection:
            return False
        self.cache.rollback(len(piece))
        self._place(selection)
        self._next_logits = self._forward(piece, all_logits=False)[-1]
        logger.debug("re-selected landmarks for a reply and encoded its last %d tokens again", len(piece))
        return True

    def _forward(self, piece: list[int], all_logits: bool) -> torch.Tensor:
        device = self.model.device
        hook = self.memory if self.memory is not None and self.memory.hooks_attention else None
        if hook is not None:
            hook.queries.begin(self.cache.length)
        with hooked(hook):
            output = self.model(
                input_ids=torch.tensor([piece], device=device),  # [1, piece]
                cache=self.cache,
                position_ids=self.cache.positions(len(piece), device=device),  # [1, piece]
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
        return output.logits[0]

    def _piece_nll(self, piece: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Loss of each token of `piece`, predicted by the logits before it: [piece] or [piece - 1]."""
        if self._next_logits is not None:
            logits = torch.cat((self._next_logits[None], logits[:-1]))  # [piece, vocab]
            targets = torch.tensor(piece, dtype=torch.long, device=logits.device)
        else:
            logits, targets = logits[:-1], torch.tensor(piece[1:], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), targets, reduction="none").cpu()

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: set[int] | None = None,
                 banned_ids: set[int] | None = None) -> Iterator[int]:
        """Feed `prompt_ids`, then yield up to `max_new_tokens` new token ids one at a time.

        Greedy at temperature 0, else seeded nucleus sampling. A stop id ends generation and is
        not yielded; every yielded token is fed back, so the stream continues after it. Banned
        ids are never sampled.
        """
        check_sampling(max_new_tokens, temperature, top_p)
        generator = torch.Generator().manual_seed(seed)
        if prompt_ids:
            self.feed(prompt_ids)
            self.refresh()
        logits = self._next_logits
        if logits is None:
            raise ValueError("generate() needs a prompt or earlier input to continue from")
        banned = torch.tensor(sorted(banned_ids or ()), dtype=torch.long)
        for _ in range(max_new_tokens):
            if len(banned):
                logits = logits.clone()
                logits[banned.to(logits.device)] = float("-inf")
            token = sample(logits, temperature, top_p, generator)
            if stop_ids and token in stop_ids:
                return
            yield token
            logits = self.feed([token]).next_logits

    def saturation(self) -> Saturation:
        cache = self.cache
        if cache is None:
            return Saturation(tokens_seen=0, entries_used=0, peak_entries=0, budget=0, pinned=0, landmarks=0,
                              window_tokens=0, evicted_tokens=0, eviction_events=0)
        return Saturation(tokens_seen=self.tokens_seen, entries_used=cache.length, peak_entries=self.peak_entries,
                          budget=cache.capacity,
                          pinned=min(cache.pinned, cache.length), landmarks=cache.landmarks, retrieved=cache.retrieved,
                          window_tokens=cache.window_length, evicted_tokens=cache.evicted_tokens,
                          eviction_events=cache.eviction_events)

    def _report(self) -> None:
        saturation = self.saturation()
        logger.debug("saturation %.3f: %d of %d entries, %d tokens seen, %d evicted", saturation.fraction,
                     saturation.entries_used, saturation.budget, saturation.tokens_seen, saturation.evicted_tokens)
        if self.on_saturation is not None:
            self.on_saturation(saturation)


def check_memory_fits(memory: LandmarkMemory, config: CacheConfig) -> None:
    """Raise ValueError when the cache config has too few slots for the memory's settings."""
    settings = memory.config
    if settings.policy != "retrieve" and config.landmark_slots < settings.centroids:
        raise ValueError(f"a landmark memory needs landmark_slots >= {settings.centroids} in the cache "
                         f"config, got {config.landmark_slots}")
    if settings.policy == "retrieve" and config.retrieval_slots < settings.retrieve * config.chunk:
        raise ValueError(f"restoring {settings.retrieve} chunks of {config.chunk} tokens needs retrieval_slots >= "
                         f"{settings.retrieve * config.chunk}, got {config.retrieval_slots}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Pick the next token from `logits` [vocab]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest prefix reaching top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])
