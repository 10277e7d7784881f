"""Redis connections against real servers: the local one, an embedded one, and one that is down."""

from __future__ import annotations

import socket

import pytest
import redis

from ctxmem.store.connection import check_binary_client, connect, describe, start_embedded, validate_url
from tests.conftest import REDIS_URL


def test_connect_from_url_roundtrips_bytes(redis_client):
    _, prefix = redis_client
    client = connect(REDIS_URL)
    client.set(f"{prefix}:blob", b"\x00\xff\x10")
    assert client.get(f"{prefix}:blob") == b"\x00\xff\x10"
    assert describe(client) == "redis://127.0.0.1:6379/0"


def test_connect_reads_environment(monkeypatch):
    monkeypatch.setenv("CTXMEM_REDIS_URL", REDIS_URL)
    assert connect().ping()


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "postgres://x"])
def test_invalid_scheme_rejected(url):
    with pytest.raises(ValueError, match="invalid Redis URL"):
        validate_url(url)


def test_decoding_client_rejected():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=True"):
        check_binary_client(client)


def test_unreachable_server_named():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"cannot reach Redis at redis://127.0.0.1:{port}/0") as error:
        connect(f"redis://:secret-pw@127.0.0.1:{port}/0")
    assert "secret-pw" not in str(error.value)


def test_tls_url_described_as_tls():
    assert describe(redis.Redis.from_url("rediss://:pw@127.0.0.1:6390/2")) == "rediss://127.0.0.1:6390/2"


def test_embedded_server_persists_between_starts(tmp_path):
    path = tmp_path / "embedded.db"
    client = start_embedded(path)
    client.set("ctxmem-test:kept", b"value")
    assert describe(client).startswith("unix://")
    client.shutdown(save=True)

    reopened = start_embedded(path)
    assert reopened.get("ctxmem-test:kept") == b"value"
    reopened.shutdown(save=False)


def test_embedded_is_default_without_url(monkeypatch, tmp_path):
    monkeypatch.delenv("CTXMEM_REDIS_URL", raising=False)
    monkeypatch.setenv("CTXMEM_HOME", str(tmp_path))
    client = connect()
    assert client.ping()
    assert (tmp_path / "embedded-redis.db").parent.is_dir()
    client.shutdown(save=False)
