"""The session store against real Redis: round trips, rollback, leases, fencing, two processes, TTL, bad input.

Every test uses the unique prefix of the `redis_client` fixture, which deletes the test's keys
afterwards. The outage test runs a private redis-server (the `private_redis` fixture).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from datetime import datetime

import pytest
import redis
import torch
from redis.crc import key_slot

from ctxmem.store.codec import encode
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.sessions import Lease, SessionDataError, SessionLockError, SessionStore
from tests.conftest import REDIS_URL
from tests.test_store_landmarks import make_chunk, make_landmark, same_bits

STORE_LOGGER = "ctxmem.store.sessions"
SESSION_KEYS = ("fence", "lock", "messages", "meta", "state")

TOOL_CALL_MESSAGES = [
    {"role": "user", "content": "Wie wird das Wetter in Zürich? 天气 ☀️"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_0", "type": "function",
                     "function": {"name": "weather", "arguments": {"city": "Zürich", "days": [1, 2]}}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp\": -3.5}", "raw": b"\x00\xff"},
    {"role": "assistant", "content": "Kalt: −3,5 °C.", "tokens": 7, "logprob": -0.25, "meta": {1: "int key"}},
]


@pytest.fixture
def store(redis_client) -> SessionStore:
    client, prefix = redis_client
    return SessionStore(client, prefix=prefix)


def session_keys(client: redis.Redis, prefix: str, session_id: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:{{{session_id}}}:*"))


def key(prefix: str, session_id: str, name: str) -> str:
    return f"{prefix}:{{{session_id}}}:{name}"


def commit_turn(store: SessionStore, session_id: str, state: dict, append: list[dict], keep: int | None = None) -> int:
    with store.lease(session_id) as lease:
        return store.commit(lease, state, append=append, keep=keep)


def expire_lease(store: SessionStore, session_id: str) -> Lease:
    """Acquire a lease on a store whose lock_timeout is short, and wait until its lock has expired."""
    lease = store.acquire(session_id)
    time.sleep(store.lock_timeout + 0.1)
    return lease


def raw_session(client: redis.Redis, prefix: str, session_id: str) -> tuple:
    """The bytes of the session's message list and state blob, to show that nothing changed."""
    return (client.lrange(key(prefix, session_id, "messages"), 0, -1),
            client.get(key(prefix, session_id, "state")))


# Round trips


def test_commit_load_round_trip(store):
    kv = torch.randn(2, 3, 4, dtype=torch.float32).bfloat16()
    kv[0, 0, :3] = torch.tensor([-0.0, float("inf"), float("nan")])
    state = {"position": 4096, "window": [1, 2, 3], "temperature": 0.7, "name": "Grüße", "none": None,
             "cache": {"keys": kv, "ids": torch.arange(5)}}

    count = commit_turn(store, "round-trip", state, TOOL_CALL_MESSAGES)
    loaded = store.load_state("round-trip")

    assert count == 4
    assert store.message_count("round-trip") == 4
    assert store.messages("round-trip") == TOOL_CALL_MESSAGES
    assert same_bits(loaded["cache"]["keys"], kv)
    assert same_bits(loaded["cache"]["ids"], torch.arange(5))
    assert {name: value for name, value in loaded.items() if name != "cache"} == {
        name: value for name, value in state.items() if name != "cache"}


def test_tuples_come_back_as_lists(store):
    commit_turn(store, "tuples", {"span": (1, 2)}, [{"pair": ("a", "b")}])
    assert store.load_state("tuples") == {"span": [1, 2]}
    assert store.messages("tuples") == [{"pair": ["a", "b"]}]


def test_missing_session_reads_empty(store):
    assert store.load_state("nothing") is None
    assert store.messages("nothing") == []
    assert store.message_count("nothing") == 0
    assert not store.exists("nothing")
    assert store.snapshot("nothing") == (None, [])


def test_messages_range_like_lrange(store):
    commit_turn(store, "ranges", {}, [{"n": n} for n in range(6)])
    assert store.messages("ranges", 2, 3) == [{"n": 2}, {"n": 3}]
    assert store.messages("ranges", -2) == [{"n": 4}, {"n": 5}]
    assert store.messages("ranges", 4, 100) == [{"n": 4}, {"n": 5}]


def test_snapshot_reads_state_and_messages(store):
    commit_turn(store, "snap", {"turn": 1}, [{"n": 0}, {"n": 1}])
    assert store.snapshot("snap") == ({"turn": 1}, [{"n": 0}, {"n": 1}])


def test_large_append_in_one_commit(store):
    records = [{"n": n} for n in range(2500)]
    assert commit_turn(store, "large", {}, records) == 2500
    assert store.messages("large") == records


# Append order and rollback


def test_append_order_over_commits(store):
    for turn in range(4):
        count = commit_turn(store, "order", {"turn": turn}, [{"turn": turn, "part": part} for part in range(2)])
        assert count == 2 * (turn + 1)

    expected = [{"turn": turn, "part": part} for turn in range(4) for part in range(2)]
    assert store.messages("order") == expected
    assert store.load_state("order") == {"turn": 3}


def test_commit_without_append_keeps_messages(store):
    commit_turn(store, "state-only", {"v": 1}, [{"n": 0}])
    assert commit_turn(store, "state-only", {"v": 2}, []) == 1
    assert store.load_state("state-only") == {"v": 2}


def test_keep_trims_then_appends(store):
    commit_turn(store, "rollback", {"turn": 0}, [{"n": n} for n in range(5)])

    count = commit_turn(store, "rollback", {"turn": 1}, [{"n": "new"}], keep=2)

    assert count == 3
    assert store.messages("rollback") == [{"n": 0}, {"n": 1}, {"n": "new"}]
    assert store.load_state("rollback") == {"turn": 1}


@pytest.mark.parametrize(("keep", "expected"), [(0, []), (3, [0, 1, 2]), (None, [0, 1, 2])])
def test_keep_bounds(store, keep, expected):
    commit_turn(store, f"keep-{keep}", {}, [{"n": n} for n in range(3)])
    assert commit_turn(store, f"keep-{keep}", {}, [], keep=keep) == len(expected)
    assert store.messages(f"keep-{keep}") == [{"n": n} for n in expected]


def test_keep_beyond_count_writes_nothing(store, redis_client):
    client, prefix = redis_client
    commit_turn(store, "too-far", {"turn": 0}, [{"n": 0}, {"n": 1}])
    before = raw_session(client, prefix, "too-far")

    with store.lease("too-far") as lease:
        with pytest.raises(ValueError, match="invalid keep=3 for session 'too-far', which has 2 messages: "
                                             "pass keep between 0 and 2"):
            store.commit(lease, {"turn": 1}, append=[{"n": "new"}], keep=3)

    assert raw_session(client, prefix, "too-far") == before


# Leases


def test_second_acquire_times_out(store):
    first = store.acquire("busy")
    started = time.monotonic()

    with pytest.raises(SessionLockError, match="session 'busy': timed out after 0.2 s .*held by another writer"):
        store.acquire("busy", wait=0.2)

    assert time.monotonic() - started >= 0.2
    store.release(first)
    second = store.acquire("busy", wait=0.2)
    assert second.fence > first.fence
    store.release(second)


def test_fence_increases_on_every_acquire(store):
    fences = []
    for _ in range(4):
        with store.lease("fences") as lease:
            fences.append(lease.fence)
            assert lease.token.startswith(f"{lease.fence}:")
            assert len(lease.token.split(":")[1]) == 32
    assert fences == [1, 2, 3, 4]


def test_acquire_waits_for_release(redis_client):
    client, prefix = redis_client
    store = SessionStore(client, prefix=prefix, lock_timeout=0.3)
    store.acquire("waiting")

    # The first lease is never released, so the second acquire succeeds once the lock expires.
    started = time.monotonic()
    lease = store.acquire("waiting", wait=5)

    assert 0.1 < time.monotonic() - started < 2
    assert lease.fence == 2


def test_lease_released_on_error(store, redis_client):
    client, prefix = redis_client
    with pytest.raises(KeyError):
        with store.lease("error"):
            raise KeyError("failure inside the block")
    assert client.get(key(prefix, "error", "lock")) is None


def test_renew_extends_lease(redis_client):
    client, prefix = redis_client
    store = SessionStore(client, prefix=prefix, lock_timeout=0.4)
    lease = store.acquire("renewed")

    for _ in range(3):
        time.sleep(0.2)
        store.renew(lease)

    assert store.commit(lease, {"ok": True}, append=[{"n": 0}]) == 1
    store.release(lease)


def test_lock_key_holds_token_with_expiry(store, redis_client):
    client, prefix = redis_client
    with store.lease("locked") as lease:
        assert client.get(key(prefix, "locked", "lock")) == lease.token.encode()
        assert 0 < client.pttl(key(prefix, "locked", "lock")) <= 30_000
        assert client.get(key(prefix, "locked", "fence")) == str(lease.fence).encode()


# Expiry and fencing


def test_expired_writer_commit_rejected(redis_client):
    client, prefix = redis_client
    slow = SessionStore(client, prefix=prefix, lock_timeout=0.2)
    fast = SessionStore(client, prefix=prefix)
    first = slow.acquire("expiry")
    slow.commit(first, {"writer": "first"}, append=[{"writer": "first"}])
    time.sleep(0.3)

    second = fast.acquire("expiry", wait=0)
    fast.commit(second, {"writer": "second"}, append=[{"writer": "second"}], keep=0)
    with pytest.raises(SessionLockError, match="session 'expiry': commit rejected, nothing written: the lease "
                                               "with fence 1 was lost .*held by another writer with fence 2"):
        slow.commit(first, {"writer": "first"}, append=[{"writer": "first, late"}])

    assert fast.load_state("expiry") == {"writer": "second"}
    assert fast.messages("expiry") == [{"writer": "second"}]
    with pytest.raises(SessionLockError, match="session 'expiry': cannot renew the lease with fence 1"):
        slow.renew(first)


def test_expired_lease_without_successor_rejected(redis_client):
    client, prefix = redis_client
    store = SessionStore(client, prefix=prefix, lock_timeout=0.2)
    lease = expire_lease(store, "lapsed")

    with pytest.raises(SessionLockError, match="session 'lapsed': .*the lock expired or was released"):
        store.commit(lease, {"late": True}, append=[{"n": 0}])
    with pytest.raises(SessionLockError, match="the lock expired or was released"):
        store.renew(lease)

    assert not store.exists("lapsed")
    assert session_keys(client, prefix, "lapsed") == [key(prefix, "lapsed", "fence").encode()]


def test_release_of_expired_lease_logs(redis_client, caplog):
    client, prefix = redis_client
    store = SessionStore(client, prefix=prefix, lock_timeout=0.2)
    lease = expire_lease(store, "late-release")
    other = SessionStore(client, prefix=prefix).acquire("late-release")

    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        store.release(lease)

    assert "'late-release' with fence 1 had already expired" in caplog.text
    assert client.get(key(prefix, "late-release", "lock")) == other.token.encode()


def test_old_writer_after_newer_commit_rejected(redis_client):
    client, prefix = redis_client
    slow = SessionStore(client, prefix=prefix, lock_timeout=0.2)
    fast = SessionStore(client, prefix=prefix)
    stale = expire_lease(slow, "fenced")
    commit_turn(fast, "fenced", {"writer": "newer"}, [{"writer": "newer"}])
    assert client.get(key(prefix, "fenced", "lock")) is None
    before = raw_session(client, prefix, "fenced")

    with pytest.raises(SessionLockError, match="session 'fenced': commit rejected, nothing written"):
        slow.commit(stale, {"writer": "older"}, append=[{"writer": "older"}])

    assert raw_session(client, prefix, "fenced") == before


def test_stale_fence_rejected_even_with_lock(redis_client):
    client, prefix = redis_client
    slow = SessionStore(client, prefix=prefix, lock_timeout=0.2)
    fast = SessionStore(client, prefix=prefix)
    stale = expire_lease(slow, "restored")
    commit_turn(fast, "restored", {"writer": "newer"}, [{"writer": "newer"}])
    before = raw_session(client, prefix, "restored")

    # As after a failover to a replica that missed the newer lock writes: the lock holds the
    # old token again, so only the fence check can stop the old writer.
    client.set(key(prefix, "restored", "lock"), stale.token, px=5000)
    with pytest.raises(SessionLockError, match="stale writer, the lease has fence 1 but a writer with fence 2 "
                                               "has already committed"):
        slow.commit(stale, {"writer": "older"}, append=[{"writer": "older"}])

    assert raw_session(client, prefix, "restored") == before


def test_fence_stays_above_last_commit(store, redis_client):
    client, prefix = redis_client
    for _ in range(3):
        commit_turn(store, "refenced", {}, [])
    client.delete(key(prefix, "refenced", "fence"))  # as when the fence key expired before the meta hash

    with store.lease("refenced") as lease:
        assert lease.fence == 4
        store.commit(lease, {"after": "loss"})
    assert store.load_state("refenced") == {"after": "loss"}


# Two writer processes


def run_writer(prefix: str, session_id: str, name: str, turns: int, start: multiprocessing.Barrier) -> None:
    """Commit `turns` turns of two records each under a lease, after reading the count and state.

    The pause between turns leaves the lock free for a while, so that the other writer's polling
    acquire can take it and the two writers alternate.
    """
    store = SessionStore(redis.Redis.from_url(REDIS_URL), prefix=prefix, lock_timeout=10)
    start.wait(timeout=60)
    for turn in range(turns):
        time.sleep(0.003)
        with store.lease(session_id, wait=30) as lease:
            count = store.message_count(session_id)
            state = store.load_state(session_id) or {"commits": 0}
            records = [{"writer": name, "turn": turn, "part": part} for part in range(2)]
            new_count = store.commit(lease, {"commits": state["commits"] + 1, "last": name}, append=records)
            if new_count != count + 2:
                raise AssertionError(f"{name} turn {turn}: read {count} messages, commit returned {new_count}")


def test_two_processes_interleave_whole_commits(store):
    turns = 100
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=run_writer, args=(store.keys.prefix, "shared", name, turns, start))
               for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        if writer.is_alive():
            writer.kill()
    assert [writer.exitcode for writer in writers] == [0, 0]

    records = store.messages("shared")
    commits = [(records[i]["writer"], records[i]["turn"]) for i in range(0, len(records), 2)]

    assert len(records) == 2 * 2 * turns
    for i in range(0, len(records), 2):
        assert records[i] == {"writer": commits[i // 2][0], "turn": commits[i // 2][1], "part": 0}
        assert records[i + 1] == {"writer": commits[i // 2][0], "turn": commits[i // 2][1], "part": 1}
    assert sorted(commits) == [(name, turn) for name in ("a", "b") for turn in range(turns)]
    for name in ("a", "b"):
        assert [turn for writer, turn in commits if writer == name] == list(range(turns))
    assert store.load_state("shared")["commits"] == 2 * turns
    switches = sum(1 for previous, current in zip(commits, commits[1:]) if previous[0] != current[0])
    assert switches >= 3, f"the writers alternated only {switches} times, so the lock was barely contended"


# Meta, listing, TTL, keys, delete


def test_commit_sets_meta_and_sessions(store, redis_client):
    client, prefix = redis_client
    before = time.time()
    commit_turn(store, "listed", {}, [{"n": 0}])
    first = client.hgetall(key(prefix, "listed", "meta"))
    commit_turn(store, "listed", {}, [{"n": 1}])
    second = client.hgetall(key(prefix, "listed", "meta"))

    assert datetime.fromisoformat(second[b"updated"].decode()).tzinfo is not None
    assert second[b"created"] == first[b"created"]
    assert second[b"updated"] >= first[b"updated"]
    assert (first[b"fence"], second[b"fence"]) == (b"1", b"2")
    assert client.zscore(f"{prefix}:sessions", "listed") >= before
    assert LandmarkStore(client, prefix=prefix).scan_sessions() == ["listed"]


def test_keys_carry_prefix_and_hash_tag(store, redis_client):
    client, prefix = redis_client
    lease = store.acquire("tagged")
    store.commit(lease, {}, append=[{"n": 0}])

    keys = session_keys(client, prefix, "tagged")

    assert keys == [key(prefix, "tagged", name).encode() for name in SESSION_KEYS]
    assert {key_slot(name) for name in keys} == {key_slot(b"tagged")}
    store.release(lease)


def test_ttl_on_every_session_key(redis_client):
    client, prefix = redis_client
    landmarks = LandmarkStore(client, prefix=prefix)
    landmarks.put(make_landmark("expiring", 0))
    landmarks.put_chunk(make_chunk("expiring", 0))
    store = SessionStore(client, prefix=prefix, ttl_seconds=300)

    commit_turn(store, "expiring", {"v": 1}, [{"n": 0}])
    keys = session_keys(client, prefix, "expiring")

    assert len(keys) == 8
    for name in keys:
        assert 0 < client.ttl(name) <= 300, name


def test_ttl_kept_on_state_only_commit(redis_client):
    client, prefix = redis_client
    store = SessionStore(client, prefix=prefix, ttl_seconds=300)
    commit_turn(store, "kept", {"v": 1}, [{"n": 0}])

    commit_turn(SessionStore(client, prefix=prefix), "kept", {"v": 2}, [])

    assert 0 < client.ttl(key(prefix, "kept", "state")) <= 300


def test_no_ttl_by_default(store, redis_client):
    client, prefix = redis_client
    commit_turn(store, "lasting", {}, [{"n": 0}])
    for name in session_keys(client, prefix, "lasting"):
        assert client.ttl(name) == -1, name


def test_delete_session_without_landmarks(store, redis_client):
    client, prefix = redis_client
    commit_turn(store, "doomed", {}, [{"n": 0}])
    lease = store.acquire("doomed")

    assert store.delete("doomed") == 5
    assert session_keys(client, prefix, "doomed") == []
    assert client.zscore(f"{prefix}:sessions", "doomed") is None
    assert not store.exists("doomed")
    with pytest.raises(SessionLockError, match="the lock expired or was released"):
        store.commit(lease, {})


@pytest.mark.parametrize("order", ["sessions first", "landmarks first"])
def test_delete_composes_with_landmark_delete(store, redis_client, order):
    client, prefix = redis_client
    landmarks = LandmarkStore(client, prefix=prefix)
    landmarks.put(make_landmark("both", 0))
    commit_turn(store, "both", {}, [{"n": 0}])

    if order == "sessions first":
        store.delete("both")
        assert landmarks.indices("both") == [0]
        assert landmarks.scan_sessions() == ["both"]
        landmarks.delete("both")
    else:
        landmarks.delete("both")
        assert store.messages("both") == [{"n": 0}]
        store.delete("both")

    assert session_keys(client, prefix, "both") == []
    assert client.zscore(f"{prefix}:sessions", "both") is None


def test_exists_after_commit(store):
    assert not store.exists("present")
    commit_turn(store, "present", {}, [])
    assert store.exists("present")


# Bad input and stored data


@pytest.mark.parametrize("session_id", ["a:b", "", "x" * 200, "{x}", "a*"])
def test_invalid_session_id_rejected(store, session_id):
    calls = [store.acquire, store.messages, store.message_count, store.load_state, store.exists,
             store.delete, store.snapshot]
    for call in calls:
        with pytest.raises(ValueError, match="invalid session id .*1 to 128 characters"):
            call(session_id)


def test_forged_lease_rejected(store):
    with pytest.raises(ValueError, match="invalid session id 'a:b'"):
        store.commit(Lease("a:b", "1:x", 1), {})
    with pytest.raises(TypeError, match="lease must be a Lease"):
        store.commit("shared", {})


@pytest.mark.parametrize(("keep", "error", "message"), [
    (-1, ValueError, "invalid keep=-1: pass the number of messages to keep, 0 or more"),
    (True, TypeError, "keep must be an int or None, got bool"),
    ("2", TypeError, "keep must be an int or None, got str"),
])
def test_bad_keep_rejected(store, keep, error, message):
    with store.lease("keep") as lease:
        with pytest.raises(error, match=message):
            store.commit(lease, {}, keep=keep)
    assert not store.exists("keep")


@pytest.mark.parametrize(("state", "append", "message"), [
    ([1], [], "state must be a dict, got list"),
    ({}, {"role": "user"}, r"append must be a list of message dicts, got a dict; .*append=\[record\]"),
    ({}, [{"n": 0}, "hello"], "message record 1 of append must be a dict, got str: hello"),
    ({}, [{"n": {1, 2}}], "cannot encode message record 0 for session 'records': .*type set"),
    ({"huge": 2**64}, [], "cannot encode the state of session 'records'"),
])
def test_bad_records_rejected(store, state, append, message):
    with store.lease("records") as lease:
        with pytest.raises(TypeError, match=message):
            store.commit(lease, state, append=append)
    assert not store.exists("records")


@pytest.mark.parametrize(("name", "value", "message"), [
    ("lock_timeout", 0, "invalid lock_timeout=0: pass more than 0 seconds"),
    ("lock_timeout", float("inf"), "lock_timeout must be a finite number of seconds"),
    ("ttl_seconds", 0, "ttl_seconds must be a positive int or None, got 0"),
])
def test_bad_settings_rejected(redis_client, name, value, message):
    client, prefix = redis_client
    with pytest.raises(ValueError, match=message):
        SessionStore(client, prefix=prefix, **{name: value})


def test_negative_wait_rejected(store):
    with pytest.raises(ValueError, match="invalid wait=-1: pass 0 or more seconds"):
        store.acquire("waiting", wait=-1)


def test_decoding_client_rejected(redis_client):
    _, prefix = redis_client
    with pytest.raises(ValueError, match="decode_responses=True"):
        SessionStore(redis.Redis.from_url(REDIS_URL, decode_responses=True), prefix=prefix)


def test_unknown_schema_version_rejected(store, redis_client):
    client, prefix = redis_client
    client.set(key(prefix, "future", "state"), encode({"schema_version": 99, "fence": 1, "state": {}}))

    with pytest.raises(SessionDataError, match="session 'future' has schema version 99, but this ctxmem "
                                               "reads version 1 only"):
        store.load_state("future")


@pytest.mark.parametrize(("blob", "message"), [
    (b"\xc1", "cannot decode the state of session 'broken'"),
    (encode([1, 2]), "invalid state blob of session 'broken': expected a dict with schema_version"),
    (encode({"schema_version": 1}), "invalid state blob"),
])
def test_corrupt_state_rejected(store, redis_client, blob, message):
    client, prefix = redis_client
    client.set(key(prefix, "broken", "state"), blob)
    with pytest.raises(SessionDataError, match=message):
        store.load_state("broken")


def test_corrupt_message_rejected(store, redis_client):
    client, prefix = redis_client
    client.rpush(key(prefix, "broken", "messages"), encode({"n": 0}), encode("not a dict"))
    with pytest.raises(SessionDataError, match="invalid message 1 of session 'broken': expected a dict, got str"):
        store.messages("broken")


def test_unreachable_server_named(private_redis):
    store = SessionStore(private_redis.url, prefix="outage")
    lease = store.acquire("outage")
    private_redis.kill()

    with pytest.raises(ConnectionError, match=r"cannot reach Redis at redis://127.0.0.1:\d+/0 to commit to "
                                              "session 'outage': .*may or may not have been applied"):
        store.commit(lease, {}, append=[{"n": 0}])
    with pytest.raises(ConnectionError, match="to read messages of session 'outage'"):
        store.messages("outage")
    assert private_redis.password not in str(store.where)
