"""A landmark stream over the reference model survives a Redis outage without losing landmarks.

The stream writes to a private redis-server (see tests/private_redis.py). The server goes down
mid-stream, the stream keeps feeding while the store queues its writes, then the server comes
back on the same port and the queue is flushed. The server is killed (SIGKILL), so only its
append-only file keeps what it acknowledged before the outage.
"""

from __future__ import annotations

import logging
from typing import Iterator

import redis

from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.rope import rotary_spec
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.stream import Stream
from tests.test_store_landmarks import STORE_LOGGER, assert_same_landmark

SESSION, PREFIX = "outage-stream", "outage-test"
SINKS, WINDOW, CHUNK, SLOTS = 4, 128, 32, 2
PIECE = 50  # tokens per feed call; not a multiple of CHUNK, so evictions fall inside pieces
LANDMARKS_PER_PHASE = 3  # at least this many landmarks before, during and after the outage


def landmark_stream(model, tokenizer, store: LandmarkStore | None) -> Stream:
    memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(), SLOTS, store=store, session_id=SESSION,
                            decode=tokenizer.decode)
    config = CacheConfig(sinks=SINKS, window=WINDOW, chunk=CHUNK, landmark_slots=SLOTS)
    return Stream(model, config, memory=memory)


def feed_until(stream: Stream, pieces: Iterator[list[int]], landmarks: int) -> list[list[int]]:
    """Feed pieces until the memory contains `landmarks` landmarks; return the pieces fed."""
    fed = []
    while len(stream.memory.landmarks) < landmarks:
        piece = next(pieces)
        stream.feed(piece)
        fed.append(piece)
    return fed


def stored_blobs(url: str, store: LandmarkStore, indices: range) -> list[bytes | None]:
    """Read the raw stored bytes of landmarks `indices` with a separate client."""
    client = redis.Redis.from_url(url)
    try:
        return [client.get(store.keys.item(SESSION, "landmark", index)) for index in indices]
    finally:
        client.close()


def test_stream_survives_redis_crash(reference, held_out_text, private_redis, caplog):
    model, tokenizer = reference
    ids = tokenizer.encode(held_out_text, add_special_tokens=True)[:SINKS + WINDOW + 12 * CHUNK]
    pieces = iter([ids[start:start + PIECE] for start in range(0, len(ids), PIECE)])
    store = LandmarkStore(private_redis.url, prefix=PREFIX)
    stream = landmark_stream(model, tokenizer, store)
    memory = stream.memory
    caplog.set_level(logging.INFO, logger=STORE_LOGGER)

    # Before the outage: every landmark is written at once.
    fed = feed_until(stream, pieces, LANDMARKS_PER_PHASE)
    before = range(len(memory.landmarks))
    assert store.pending_count == 0
    assert store.indices(SESSION) == list(before)
    blobs_before = stored_blobs(private_redis.url, store, before)
    assert None not in blobs_before

    # During the outage: the stream keeps going and the store queues each landmark. SIGKILL is
    # the harder case for the data written before, because Redis cannot save anything on exit.
    private_redis.kill()
    fed += feed_until(stream, pieces, before.stop + LANDMARKS_PER_PHASE)
    during = range(before.stop, len(memory.landmarks))
    assert store.pending_count == len(during)

    # After the restart: the next landmark's put sends the queue first, in order.
    private_redis.start()
    fed += feed_until(stream, pieces, during.stop + LANDMARKS_PER_PHASE)
    for piece in pieces:
        stream.feed(piece)
        fed.append(piece)
    after = range(during.stop, len(memory.landmarks))
    assert store.flush() == 0
    assert store.pending_count == 0

    # The stream completed, with one landmark per evicted chunk and no gaps between them.
    assert sum(map(len, fed)) == len(ids)
    assert stream.tokens_seen == len(ids)
    assert len(memory.landmarks) == stream.cache.evicted_tokens // CHUNK
    assert len(after) >= LANDMARKS_PER_PHASE
    spans = [(landmark.record.token_start, landmark.record.token_end) for landmark in memory.landmarks]
    assert spans == [(SINKS + CHUNK * i, SINKS + CHUNK * (i + 1)) for i in range(len(spans))]

    # Every landmark is stored as built; those from before the outage are the same bytes as before it.
    assert store.indices(SESSION) == list(range(len(memory.landmarks)))
    for index, landmark in enumerate(memory.landmarks):
        assert_same_landmark(store.get(SESSION, index, fingerprint=memory.fingerprint), landmark)
    assert stored_blobs(private_redis.url, store, before) == blobs_before

    # One warning for the whole outage, naming the server without its password, and one recovery line.
    store_records = [record for record in caplog.records if record.name == STORE_LOGGER]
    warnings = [record.getMessage() for record in store_records if record.levelno == logging.WARNING]
    recoveries = [record.getMessage() for record in store_records if "reachable again" in record.getMessage()]
    assert len(warnings) == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{private_redis.port}/0" in warnings[0]
    assert recoveries == [f"Redis at redis://127.0.0.1:{private_redis.port}/0 is reachable again: "
                          f"flushed {len(during)} queued writes"]
    assert private_redis.password not in caplog.text

