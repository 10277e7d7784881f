"""Attention statistics: the mass computation, the counts a stream records, and `ctxmem run --attention-stats`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from ctxmem.attention import attention_mass
from ctxmem.cli import main
from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.rope import rotary_spec
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.usage import UsageStore
from ctxmem.stream import Stream
from tests.conftest import REDIS_URL
from tests.inspect_data import feed_conversation


class Head:
    """What transformers' eager attention reads from an attention module."""

    def __init__(self, groups: int):
        self.num_key_value_groups = groups
        self.training = False


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_attention_mass_matches_eager_weights(mask_kind):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 3, 8, generator=generator)  # [batch, heads, q, head_dim]
    key = torch.randn(1, 2, 7, 8, generator=generator)  # [batch, kv_heads, kv, head_dim], 2 query heads each
    value = torch.randn(1, 2, 7, 8, generator=generator)
    causal = torch.arange(7)[None] <= torch.arange(4, 7)[:, None]  # [q, kv]: the queries are the last 3 keys
    allowed = causal.clone()
    allowed[:, 1] = False  # a masked key, to show the mask is applied
    additive = torch.zeros(1, 1, 3, 7).masked_fill(~allowed, float("-inf"))
    mask = {"none": None, "bool": allowed[None, None], "additive": additive}[mask_kind]
    reference_mask = torch.zeros(1, 1, 3, 7).masked_fill(~causal, float("-inf")) if mask is None else additive

    mass = attention_mass(query, key, mask, scaling=8 ** -0.5)
    _, weights = eager_attention_forward(Head(groups=2), query, key, value, reference_mask, scaling=8 ** -0.5)
    expected = weights[0].sum(dim=1).mean(dim=0)  # [kv]: summed over queries, averaged over heads
    assert torch.allclose(mass, expected, atol=1e-6)
    assert mass.sum() == pytest.approx(3.0, abs=1e-5)  # each query spreads a probability of 1
    if mask is not None:
        assert mass[1] == 0


def _stream(model, tokenizer, store, session_id: str, stats: bool) -> Stream:
    config = LandmarkConfig(attention_stats=stats)
    memory = LandmarkMemory(model, rotary_spec(model), config, slots=2, store=store, session_id=session_id,
                            decode=tokenizer.decode)
    return Stream(model, CacheConfig(chunk=32, landmark_slots=2), memory=memory)


def test_stream_counts_injections_and_mass(reference, redis_client, held_out_text):
    client, prefix = redis_client
    model, tokenizer = reference
    store = LandmarkStore(client, prefix=prefix)
    ids = tokenizer.encode(held_out_text[:3000])
    with_stats = _stream(model, tokenizer, store, "stats", stats=True)
    without = _stream(model, tokenizer, store, "plain", stats=False)
    with_stats.feed(ids)
    without.feed(ids)
    with_stats.memory.flush_usage()

    # The statistics only observe: the model computes the same logits.
    assert torch.allclose(with_stats._next_logits, without._next_logits, atol=1e-5)
    usage = UsageStore(client, store.keys).read("stats")
    assert UsageStore(client, store.keys).read("plain") == {}
    assert with_stats.memory.usage == {}  # flushed

    # The recent policy places the 2 newest landmarks at each eviction, so every landmark is
    # placed by the eviction that creates it and by the next one. The newest is placed once.
    count = len(with_stats.memory.landmarks)
    assert count >= 5
    assert [usage[index].injected for index in range(count)] == [2] * (count - 1) + [1]
    assert all(usage[index].mass > 0 for index in range(count))
    # Each query spreads a probability of 1 over all keys, averaged over layers and heads.
    fed_after_first_placement = len(ids) - with_stats.memory.landmarks[0].record.token_end
    assert sum(entry.mass for entry in usage.values()) < fed_after_first_placement


def test_session_commit_writes_usage(reference, redis_client):
    client, prefix = redis_client
    model, tokenizer = reference
    manager = feed_conversation(model, tokenizer, client, prefix, "talk", turns=2)
    usage = UsageStore(client, manager.landmark_store.keys).read("talk")
    assert usage and all(entry.injected >= 1 for entry in usage.values())
    manager.delete("talk")
    assert not client.exists(manager.landmark_store.keys.usage("talk"))


def test_run_attention_stats_needs_a_session(tmp_path, capsys):
    text = tmp_path / "play.txt"
    text.write_text("To be or not to be.")
    assert main(["run", str(text), "--landmarks", "2", "--attention-stats"]) == 2
    assert "--attention-stats stores its counts beside the landmarks in Redis; add --session ID" in capsys.readouterr().err


def test_run_attention_stats_writes_usage(tmp_path, held_out_text, redis_client):
    client, prefix = redis_client
    session = f"stats-{uuid.uuid4().hex[:8]}"
    text = tmp_path / "play.txt"
    text.write_text(held_out_text[:4000], encoding="utf-8")
    command = [str(Path(sys.executable).parent / "ctxmem"), "run", str(text), "--landmarks", "2", "--chunk", "32",
               "--session", session, "--redis", REDIS_URL, "--prefix", prefix, "--attention-stats", "--json"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        written = json.loads(result.stdout)["landmarks_written"]
        usage = client.hgetall(f"{prefix}:{{{session}}}:usage")
        assert written > 2
        assert {field.decode() for field in usage} >= {f"{index}:injected" for index in range(written)}
    finally:
        LandmarkStore(client, prefix=prefix).delete(session)
