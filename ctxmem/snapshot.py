"""Save a Stream's state between turns and load it back, exactly or by recomputing the window.

A snapshot is a plain dict (msgpack-ready, tensors included) of what a `Stream` needs beyond
the stored chunks and landmarks: token ids of the pinned region and the window, counters,
the next-token logits and the landmark selection. With `exact`, it also holds the KV of the
pinned tokens and of the window's incomplete last chunk, keys without RoPE; the complete
chunks are stored once each, as `Stream.on_chunk` passes them on, so saving appends and never
rewrites. Loading rotates every entry to its new index.
"""

from __future__ import annotations

from typing import Callable

import torch

from ctxmem.landmarks.policies import Selection
from ctxmem.stream import Stream

ChunkLoader = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # chunk index -> un-rotated KV


def capture(stream: Stream, exact: bool) -> dict:
    """Return the snapshot of `stream`; with `exact`, call `stream.emit_chunks()` first."""
    cache = stream.cache
    state = {
        "pinned_ids": list(stream.pinned_ids), "window_ids": list(stream.window_ids),
        "tokens_seen": stream.tokens_seen, "peak_entries": stream.peak_entries,
        "evicted_tokens": cache.evicted_tokens if cache else 0,
        "eviction_events": cache.eviction_events if cache else 0,
        "chunks_emitted": stream.chunks_emitted,
        "next_logits": None if stream._next_logits is None else stream._next_logits.detach().cpu(),
        "selection": _selection(stream),
        "queries": _queries(stream),
    }
    if exact and cache is not None and cache.length:
        state["pinned_kv"] = list(cache.entries(0, cache.pinned))
        tail = stream.chunks_emitted * stream.config.chunk - cache.evicted_tokens  # first unsaved window token
        state["tail_kv"] = list(cache.window_entries(cache.window_length - tail, tail))
    return state


def _selection(stream: Stream) -> dict | None:
    memory = stream.memory
    if memory is None or memory.selection is None:
        return None
    return {"landmarks": memory.selection.landmarks, "chunks": memory.selection.chunks}


def _queries(stream: Stream) -> dict | None:
    memory = stream.memory
    if memory is None or not memory.queries.ready:
        return None
    log = memory.queries
    return {"queries": [query.cpu() for query in log.queries], "positions": log.positions.tolist()}


def restore(stream: Stream, state: dict, load_chunk: ChunkLoader | None) -> None:
    """Load `state` into a fresh `stream`, exactly from stored KV when `load_chunk` is given.

    Without `load_chunk` (recompute mode) the pinned tokens and the window are encoded again
    after the landmarks are placed, so the window no longer sees what had been evicted.
    The stream's memory must already hold the session's landmarks (and chunks, for retrieve).
    """
    if not state["pinned_ids"]:
        return
    if stream.cache is None:  # sinks="system": the pinned count sizes the cache
        stream.cache = stream._build_cache(len(state["pinned_ids"]))
    if load_chunk is None:
        _recompute(stream, state)
    else:
        _reload(stream, state, load_chunk)
    _restore_counters(stream, state)


def _reload(stream: Stream, state: dict, load_chunk: ChunkLoader) -> None:
    cache, device, dtype = stream.cache, stream.model.device, stream.model.dtype
    to_device = lambda kv: (kv[0].to(device, dtype), kv[1].to(device, dtype))  # noqa: E731
    cache.append_entries(*to_device(state["pinned_kv"]))
    _place_saved_selection(stream, state)
    first = state["evicted_tokens"] // stream.config.chunk
    for index in range(first, state["chunks_emitted"]):
        cache.append_entries(*to_device(load_chunk(index)))
    cache.append_entries(*to_device(state["tail_kv"]))
    stream.pinned_ids, stream.window_ids = list(state["pinned_ids"]), list(state["window_ids"])


def _recompute(stream: Stream, state: dict) -> None:
    stream.feed(state["pinned_ids"])
    _place_saved_selection(stream, state)
    if state["window_ids"]:
        stream.feed(state["window_ids"])


def _place_saved_selection(stream: Stream, state: dict) -> None:
    memory, saved = stream.memory, state.get("selection")
    if memory is None or saved is None or not memory.landmarks:
        return
    stream._place(Selection(landmarks=saved["landmarks"], chunks=saved["chunks"]))


def _restore_counters(stream: Stream, state: dict) -> None:
    cache = stream.cache
    stream.tokens_seen, stream.peak_entries = state["tokens_seen"], state["peak_entries"]
    cache.evicted_tokens, cache.eviction_events = state["evicted_tokens"], state["eviction_events"]
    stream.chunks_emitted = state["chunks_emitted"]
    if state["next_logits"] is not None:
        stream._next_logits = state["next_logits"].to(stream.model.device)
    saved_queries = state.get("queries")
    if stream.memory is not None and saved_queries is not None:
        log = stream.memory.queries
        log.queries = [query.to(stream.model.device) for query in saved_queries["queries"]]
        log.positions = torch.tensor(saved_queries["positions"])
