"""The landmark store against real Redis: round trips, keys, TTL, bad input, and an outage.

The outage tests run a private redis-server (the `private_redis` fixture of conftest.py) on a
free loopback port with an append-only file, stop it mid-way and start it again on the same port
and data folder.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

import msgpack
import pytest
import redis
import torch
from redis.crc import key_slot

from ctxmem.store import codec
from ctxmem.store.keys import KeySchema, validate_prefix
from ctxmem.store.landmarks import LandmarkNotFoundError, LandmarkStore
from ctxmem.store.records import Chunk, Landmark, LandmarkMismatchError, LandmarkRecord, ModelFingerprint

STORE_LOGGER = "ctxmem.store.landmarks"
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_fingerprint(dtype: torch.dtype = torch.bfloat16, **changes) -> ModelFingerprint:
    fields = dict(architecture="LlamaForCausalLM", model_type="llama", config_hash="a" * 64,
                  weights_hash="b" * 64, layers=2, kv_heads=2, head_dim=8,
                  dtype=str(dtype).removeprefix("torch."))
    return ModelFingerprint(**(fields | changes))


def make_landmark(session_id: str, index: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                  fingerprint: ModelFingerprint | None = None) -> Landmark:
    """A mean landmark [2 layers, 2 KV heads, 1, head_dim 8] with -0.0, inf and NaN among its keys."""
    generator = torch.Generator().manual_seed(seed * 1000 + index)
    keys = torch.randn(2, 2, 1, 8, generator=generator).to(dtype)
    values = torch.randn(2, 2, 1, 8, generator=generator).to(dtype)
    keys[0, 0, 0, :3] = torch.tensor([-0.0, float("inf"), float("nan")])
    return Landmark.from_tensors(
        session_id=session_id, index=index, token_start=16 * index, token_end=16 * index + 16,
        text=f"chunk {index}", fingerprint=fingerprint or make_fingerprint(dtype), keys=keys, values=values,
    )


def make_chunk(session_id: str, index: int) -> Chunk:
    generator = torch.Generator().manual_seed(index)
    return Chunk.from_tensors(
        session_id=session_id, index=index, token_start=16 * index, fingerprint=make_fingerprint(),
        keys=torch.randn(2, 2, 16, 8, generator=generator).bfloat16(),
        values=torch.randn(2, 2, 16, 8, generator=generator).bfloat16(),
        token_ids=torch.arange(16 * index, 16 * index + 16),
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and raw bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a_bytes = a.contiguous().reshape(-1).view(torch.uint8)
    b_bytes = b.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a_bytes, b_bytes)


def assert_same_landmark(stored: Landmark, original: Landmark) -> None:
    assert stored.record == original.record
    assert same_bits(stored.keys, original.keys)
    assert same_bits(stored.values, original.values)


@pytest.fixture
def store(redis_client) -> LandmarkStore:
    client, prefix = redis_client
    return LandmarkStore(client, prefix=prefix)


def session_keys(client: redis.Redis, prefix: str, session_id: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:{{{session_id}}}:*"))


# Round trips and listing


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_put_get_bit_identical(store, dtype):
    landmark = make_landmark("round-trip", 3, dtype)

    assert store.put(landmark) == "stored"
    stored = store.get("round-trip", 3, fingerprint=make_fingerprint(dtype))

    assert_same_landmark(stored, landmark)
    assert stored.keys.dtype == dtype


def test_put_twice_is_unchanged(store):
    landmark = make_landmark("twice", 0)
    assert store.put(landmark) == "stored"
    assert store.put(landmark) == "unchanged"


def test_other_landmark_same_index_rejected(store):
    store.put(make_landmark("conflict", 1, seed=0))
    other = make_landmark("conflict", 1, seed=1)

    with pytest.raises(LandmarkMismatchError, match="session 'conflict' landmark 1: a different landmark"):
        store.put(other)
    assert store.put(other, replace=True) == "replaced"
    assert_same_landmark(store.get("conflict", 1), other)


def test_indices_sorted(store):
    for index in (4, 0, 2):
        store.put(make_landmark("listing", index))
    assert store.indices("listing") == [0, 2, 4]
    assert store.indices("nothing-here") == []


def test_scan_lists_sessions(store, redis_client):
    client, prefix = redis_client
    for session_id in ("beta", "alpha.1", "gamma_2-x"):
        store.put(make_landmark(session_id, 0))
    other = LandmarkStore(client, prefix=f"{prefix}:other")
    other.put(make_landmark("elsewhere", 0))

    assert store.scan_sessions() == ["alpha.1", "beta", "gamma_2-x"]
    assert other.scan_sessions() == ["elsewhere"]
    assert client.zscore(f"{prefix}:sessions", "beta") is not None


def test_chunk_round_trip(store):
    chunk = make_chunk("chunks", 2)

    assert store.put_chunk(chunk) == "stored"
    stored = store.get_chunk("chunks", 2, fingerprint=make_fingerprint())

    assert stored.record == chunk.record
    assert same_bits(stored.keys, chunk.keys)
    assert same_bits(stored.values, chunk.values)
    assert torch.equal(stored.token_ids, chunk.token_ids)
    assert store.chunk_indices("chunks") == [2]
    assert store.indices("chunks") == []


def test_missing_landmark_not_found(store):
    with pytest.raises(LandmarkNotFoundError, match="session 'empty' has no landmark 5"):
        store.get("empty", 5)


# Keys, TTL, delete


def test_keys_carry_prefix_and_hash_tag(store, redis_client):
    client, prefix = redis_client
    store.put(make_landmark("tagged", 0))
    store.put_chunk(make_chunk("tagged", 0))

    keys = session_keys(client, prefix, "tagged")

    expected = [f"{prefix}:{{tagged}}:{name}".encode()
                for name in ("chunk:0", "chunks", "landmark:0", "landmarks", "meta")]
    assert keys == expected
    assert len({key_slot(key) for key in keys}) == 1
    assert key_slot(keys[0]) == key_slot(b"tagged")


def test_meta_hash_fields(store, redis_client):
    client, prefix = redis_client
    store.put(make_landmark("meta", 0))

    meta = client.hgetall(f"{prefix}:{{meta}}:meta")

    assert meta[b"schema_version"] == b"1"
    assert ModelFingerprint.model_validate_json(meta[b"fingerprint"]) == make_fingerprint()
    assert datetime.fromisoformat(meta[b"created"].decode()).tzinfo is not None


def test_ttl_on_every_session_key(redis_client):
    client, prefix = redis_client
    store = LandmarkStore(client, prefix=prefix, ttl_seconds=300)
    store.put(make_landmark("expiring", 0))
    store.put_chunk(make_chunk("expiring", 0))
    store.put(make_landmark("expiring", 1))

    keys = session_keys(client, prefix, "expiring")

    assert len(keys) == 6
    for key in keys:
        assert 0 < client.ttl(key) <= 300, key


def test_no_ttl_by_default(store, redis_client):
    client, prefix = redis_client
    store.put(make_landmark("lasting", 0))
    for key in session_keys(client, prefix, "lasting"):
        assert client.ttl(key) == -1, key


def test_delete_one_index(store):
    for index in range(3):
        store.put(make_landmark("partial", index))
    store.put_chunk(make_chunk("partial", 1))

    assert store.delete("partial", 1) == 2
    assert store.indices("partial") == [0, 2]
    assert store.chunk_indices("partial") == []
    with pytest.raises(LandmarkNotFoundError):
        store.get("partial", 1)


def test_delete_whole_session(store, redis_client):
    client, prefix = redis_client
    for index in range(3):
        store.put(make_landmark("doomed", index))
    store.put_chunk(make_chunk("doomed", 0))

    assert store.delete("doomed") == 7
    assert session_keys(client, prefix, "doomed") == []
    assert store.scan_sessions() == []
    assert client.zscore(f"{prefix}:sessions", "doomed") is None


# Bad input


@pytest.mark.parametrize("session_id", ["a:b", "../x", "", "x" * 200, "{x}", "a b", "caf\u00e9", "a*"])
def test_invalid_session_id_rejected(store, session_id):
    with pytest.raises(ValueError, match="invalid session id .*1 to 128 characters"):
        store.get(session_id, 0)
    with pytest.raises(ValueError, match="invalid session id"):
        make_landmark(session_id, 0)


def test_session_id_of_128_characters_accepted(store):
    session_id = "s" * 128
    store.put(make_landmark(session_id, 0))
    assert store.indices(session_id) == [0]


@pytest.mark.parametrize("prefix", ["", "a b", "x{", "y}", "glob*", "q?"])
def test_invalid_prefix_rejected(prefix):
    with pytest.raises(ValueError, match="invalid key prefix"):
        KeySchema(prefix)


def test_default_prefix_valid():
    assert validate_prefix("ctxmem") == "ctxmem"
    assert KeySchema().landmark("s", 7) == "ctxmem:{s}:landmark:7"


@pytest.mark.parametrize("index", [-1, True, 1.0])
def test_invalid_index_rejected(store, index):
    with pytest.raises((TypeError, ValueError), match="index"):
        store.get("fine", index)


def test_decoding_client_rejected(redis_client):
    _, prefix = redis_client
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=True"):
        LandmarkStore(client, prefix=prefix)


def test_tampered_blob_detected(store, redis_client):
    client, prefix = redis_client
    store.put(make_landmark("tamper", 7))
    key = f"{prefix}:{{tamper}}:landmark:7"
    last = client.strlen(key) - 1
    flipped = client.getrange(key, last, last)[0] ^ 0x01
    client.setrange(key, last, bytes([flipped]))

    expected = r"session 'tamper' landmark 7: checksum mismatch \(stored"
    with pytest.raises(LandmarkMismatchError, match=expected):
        store.get("tamper", 7)


def test_truncated_blob_detected(store, redis_client):
    client, prefix = redis_client
    store.put(make_landmark("cut", 0))
    key = f"{prefix}:{{cut}}:landmark:0"
    client.set(key, client.get(key)[:-10])

    with pytest.raises(LandmarkMismatchError, match="session 'cut' landmark 0: invalid blob"):
        store.get("cut", 0)


def test_corrupt_tensor_rejected_on_put(store):
    landmark = make_landmark("bad-put", 0)
    corrupted = Landmark(record=landmark.record, keys=landmark.keys + 1, values=landmark.values)

    with pytest.raises(LandmarkMismatchError, match="checksum mismatch"):
        store.put(corrupted)
    assert store.indices("bad-put") == []


def test_wrong_shape_rejected_on_put(store):
    landmark = make_landmark("bad-shape", 0)
    wrong = Landmark(record=landmark.record, keys=landmark.keys[:1], values=landmark.values)

    with pytest.raises(LandmarkMismatchError, match=r"keys shape \[1, 2, 1, 8\] does not match"):
        store.put(wrong)


@pytest.mark.parametrize("field, value", [("weights_hash", "c" * 64), ("config_hash", "d" * 64),
                                          ("architecture", "MistralForCausalLM"), ("dtype", "float16")])
def test_other_model_fingerprint_rejected(store, field, value):
    store.put(make_landmark("model", 2))
    other = make_fingerprint(**{field: value})

    expected = f"session 'model' landmark 2: computed by another model \\({field}:"
    with pytest.raises(LandmarkMismatchError, match=expected):
        store.get("model", 2, fingerprint=other)


def test_other_model_put_into_session_rejected(store):
    store.put(make_landmark("one-model", 0))
    foreign = make_landmark("one-model", 1, fingerprint=make_fingerprint(weights_hash="e" * 64))

    expected = r"session 'one-model' landmark 1: the session contains data of another model \(weights_hash"
    with pytest.raises(LandmarkMismatchError, match=expected):
        store.put(foreign)
    assert store.indices("one-model") == [0]


def test_schema_version_mismatch_named(store, redis_client):
    client, prefix = redis_client
    landmark = make_landmark("future", 4)
    record = json.loads(landmark.record.model_dump_json()) | {"schema_version": 2}
    blob = codec.encode({"record": json.dumps(record), "keys": landmark.keys, "values": landmark.values})
    client.set(f"{prefix}:{{future}}:landmark:4", blob)

    with pytest.raises(LandmarkMismatchError, match="session 'future' landmark 4: schema version 2, but this "
                                                    "ctxmem reads version 1"):
        store.get("future", 4)


def test_blob_under_wrong_key_detected(store, redis_client):
    client, prefix = redis_client
    store.put(make_landmark("moved", 0))
    client.set(f"{prefix}:{{moved}}:landmark:9", client.get(f"{prefix}:{{moved}}:landmark:0"))

    expected = "session 'moved' landmark 9: the blob contains .* landmark 0"
    with pytest.raises(LandmarkMismatchError, match=expected):
        store.get("moved", 9)


def test_blob_fields_checked(store, redis_client):
    client, prefix = redis_client
    client.set(f"{prefix}:{{odd}}:landmark:0", msgpack.packb({"record": "{}"}))

    with pytest.raises(LandmarkMismatchError, match="expected the fields record, keys, values"):
        store.get("odd", 0)


def test_blob_tensor_fields_checked(store, redis_client):
    client, prefix = redis_client
    landmark = make_landmark("not-tensor", 0)
    blob = codec.encode({"record": landmark.record.model_dump_json(), "keys": "text", "values": landmark.values})
    client.set(f"{prefix}:{{not-tensor}}:landmark:0", blob)

    with pytest.raises(LandmarkMismatchError, match="invalid blob: keys must be a tensor, got str"):
        store.get("not-tensor", 0)


@pytest.mark.parametrize("changes, message", [
    ({"token_start": 16, "token_end": 16}, "token_start"),
    ({"centroids": 2}, "compression 'mean' needs centroids=1"),
    ({"created": datetime(2025, 1, 1)}, "timezone-aware"),
    ({"layers": 3}, "layers is 3"),
])
def test_invalid_record_rejected(changes, message):
    fields = make_landmark("record", 1).record.model_dump() | changes
    with pytest.raises(ValueError, match=message):
        LandmarkRecord(**fields)


# Redis outage


def test_outage_queues_then_flushes(private_redis, caplog):
    store = LandmarkStore(private_redis.url, prefix="outage")
    landmarks = [make_landmark("outage", index) for index in range(7)]
    for landmark in landmarks[:3]:
        assert store.put(landmark) == "stored"

    private_redis.stop()
    with caplog.at_level(logging.INFO, logger=STORE_LOGGER):
        statuses = [store.put(landmark) for landmark in landmarks[3:6]]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]

    assert statuses == ["pending"] * 3
    assert store.pending_count == 3
    assert len(warnings) == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{private_redis.port}/0" in warnings[0].getMessage()
    assert private_redis.password not in caplog.text

    with pytest.raises(ConnectionError, match=f"127.0.0.1:{private_redis.port}") as error:
        store.get("outage", 0)
    assert private_redis.password not in str(error.value)

    private_redis.start()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=STORE_LOGGER):
        assert store.put(landmarks[6]) == "stored"
    infos = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]

    assert infos == [f"Redis at redis://127.0.0.1:{private_redis.port}/0 is reachable again: "
                     "flushed 3 queued writes"]
    assert store.pending_count == 0
    assert store.indices("outage") == list(range(7))
    for landmark in landmarks:
        assert_same_landmark(store.get("outage", landmark.record.index), landmark)


def test_explicit_flush_sends_queue(private_redis):
    store = LandmarkStore(private_redis.url, prefix="flush")
    private_redis.stop()
    store.put(make_landmark("flush", 0))
    store.put_chunk(make_chunk("flush", 0))

    assert store.flush() == 0
    private_redis.start()

    assert store.flush() == 2
    assert store.indices("flush") == [0]
    assert store.chunk_indices("flush") == [0]


def test_queue_bound_drops_oldest(private_redis, caplog):
    store = LandmarkStore(private_redis.url, prefix="bounded", max_pending=2)
    private_redis.stop()
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        for index in range(4):
            store.put(make_landmark("bounded", index))
    messages = [record.getMessage() for record in caplog.records]
    drops = [message for message in messages if "dropped the oldest" in message]

    assert store.pending_count == 2
    assert len(drops) == 2
    assert "landmark 0 of session 'bounded'" in drops[0]
    private_redis.start()
    assert store.flush() == 2
    assert store.indices("bounded") == [2, 3]


def test_retry_never_overwrites(private_redis, caplog):
    queued = make_landmark("race", 5, seed=1)
    stored_meanwhile = make_landmark("race", 5, seed=2)
    store = LandmarkStore(private_redis.url, prefix="race")
    private_redis.stop()
    assert store.put(queued, replace=True) == "pending"

    private_redis.start()
    LandmarkStore(private_redis.url, prefix="race").put(stored_meanwhile)
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        assert store.flush() == 1

    assert "dropped a queued write" in caplog.text
    assert_same_landmark(store.get("race", 5), stored_meanwhile)


def test_delete_drops_queued_writes(private_redis):
    store = LandmarkStore(private_redis.url, prefix="gone")
    private_redis.stop()
    store.put(make_landmark("gone", 0))
    store.put(make_landmark("kept", 0))

    with pytest.raises(ConnectionError):
        store.delete("gone")
    private_redis.start()

    assert store.flush() == 1
    assert store.scan_sessions() == ["kept"]
