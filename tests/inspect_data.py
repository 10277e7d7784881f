"""Stored data for the inspect tests: cheap landmark sessions with tiny tensors, and real conversations."""

from __future__ import annotations

import redis
import torch

from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.manager import MemoryManager
from ctxmem.reference import corpus
from ctxmem.session import SessionSettings
from ctxmem.store.keys import KeySchema
from ctxmem.store.records import Landmark, ModelFingerprint

# A made-up model: 2 layers, 1 KV head, head_dim 4, so each landmark blob is a few hundred bytes.
TINY_FINGERPRINT = ModelFingerprint(architecture="LlamaForCausalLM", model_type="llama", config_hash="0" * 64,
                                    weights_hash="1" * 64, layers=2, kv_heads=1, head_dim=4, dtype="float32")
OTHER_FINGERPRINT = TINY_FINGERPRINT.model_copy(update={"weights_hash": "2" * 64})


def tiny_landmark(session_id: str, index: int, fingerprint: ModelFingerprint = TINY_FINGERPRINT,
                  text: str | None = None) -> Landmark:
    """Return landmark `index` over tokens [4 + 32 i, 36 + 32 i) with seeded random [2, 1, 1, 4] tensors."""
    generator = torch.Generator().manual_seed(index)
    keys = torch.randn(2, 1, 1, 4, generator=generator)  # [layers, kv_heads, 1, head_dim]
    values = torch.randn(2, 1, 1, 4, generator=generator)
    return Landmark.from_tensors(session_id=session_id, index=index, token_start=4 + 32 * index,
                                 token_end=36 + 32 * index, text=text or f"chunk number {index} of the text",
                                 fingerprint=fingerprint, keys=keys, values=values)


def write_landmarks(client: redis.Redis, prefix: str, session_id: str, count: int) -> None:
    """Store `count` tiny landmarks the way the store lays them out, in pipelined batches.

    This skips the store's put script (one round trip per landmark), so that thousands are written
    in about a second.
    """
    keys = KeySchema(prefix)
    pipeline = client.pipeline(transaction=False)
    for index in range(count):
        pipeline.set(keys.landmark(session_id, index), tiny_landmark(session_id, index).to_blob())
        pipeline.zadd(keys.landmarks(session_id), {str(index): index})
        if index % 1000 == 999:
            pipeline.execute()
    pipeline.hset(keys.meta(session_id), mapping={"schema_version": 1, "created": "2026-01-01T00:00:00+00:00",
                                                   "updated": "2026-01-01T00:00:00+00:00",
                                                   "fingerprint": TINY_FINGERPRINT.model_dump_json()})
    pipeline.execute()


def feed_conversation(model, tokenizer, client: redis.Redis, prefix: str, session_id: str, turns: int = 3,
                      attention_stats: bool = True) -> MemoryManager:
    """Feed `turns` user messages of 120 words of a held-out play, each followed by a 4-token reply.

    Chunks of 32 tokens and 2 landmark slots with the relevant policy, so landmarks are written
    and placed from the first turn on.
    """
    settings = SessionSettings(cache=CacheConfig(chunk=32, landmark_slots=2),
                               landmarks=LandmarkConfig(policy="relevant", attention_stats=attention_stats))
    manager = MemoryManager(model, tokenizer, client, prefix=prefix, settings=settings)
    session = manager.session(session_id)
    words = corpus.held_out_text().split()
    messages: list[dict] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(words[turn * 120:(turn + 1) * 120])})
        messages.append(session.generate(messages, max_new_tokens=4).message.as_dict())
    return manager


def session_snapshot(client: redis.Redis, prefix: str, session_id: str) -> dict[bytes, object]:
    """Return every key of the session with its raw value, read by type (GET, LRANGE, HGETALL, ZRANGE)."""
    base = KeySchema(prefix).session_base(session_id)
    snapshot = {}
    for key in client.scan_iter(match=base + "*", count=1000):
        kind = client.type(key)
        if kind == b"string":
            snapshot[key] = client.get(key)
        elif kind == b"list":
            snapshot[key] = client.lrange(key, 0, -1)
        elif kind == b"hash":
            snapshot[key] = client.hgetall(key)
        elif kind == b"zset":
            snapshot[key] = client.zrange(key, 0, -1, withscores=True)
    return snapshot
