"""The ctxmem command line, run as a user runs it: a separate process, output parsed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ctxmem.store.sessions import SessionStore
from ctxmem.manager import MemoryManager
from tests.conftest import REDIS_URL

CTXMEM = [str(Path(sys.executable).parent / "ctxmem")]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CTXMEM + list(args), capture_output=True, text=True, timeout=300, env=env)


def test_info_json_describes_reference():
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model_type"] == "llama"
    assert info["kv_heads"] < info["attention_heads"]
    assert info["max_position_embeddings"] == 256


def test_generate_is_deterministic_at_temperature_zero():
    first = run("generate", "--prompt", "ROMEO:", "--max-new-tokens", "12", "--json")
    second = run("generate", "--prompt", "ROMEO:", "--max-new-tokens", "12", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["completion"] == json.loads(second.stdout)["completion"]
    assert 1 <= json.loads(first.stdout)["new_tokens"] <= 12


def test_demo_runs_tool_and_pass_key():
    result = run("demo", "--checks", "--redis-url", REDIS_URL, "--json")
    assert result.returncode == 0, result.stderr
    demo = json.loads(result.stdout)
    assert "sessions" not in demo  # --checks skips the sessions
    roles = [message["role"] for message in demo["chat"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert demo["chat"][1]["text"].startswith("calls calculator(")
    assert demo["chat"][2]["text"].lstrip("-").isdigit()
    # NOTE: the bundled model copies poorly, so its pass-key answer is only checked for shape.
    assert demo["pass_key"]["expected"] == "52817"
    assert isinstance(demo["pass_key"]["correct"], bool)


@pytest.mark.parametrize("args, fragment", [
    (["info", "--model", "/no/such/model"], "'/no/such/model' not found"),
    (["info", "--dtype", "float64"], "unsupported dtype 'float64'"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "invalid max_new_tokens 0"),
    (["demo", "--redis-url", "http://127.0.0.1:6379"], "invalid Redis URL 'http://127.0.0.1:6379'"),
    (["demo", "--sessions", "0"], "invalid --sessions 0"),
    (["demo", "--prefix", "has space"], "invalid key prefix 'has space'"),
    (["chat", "--session", "no spaces allowed"], "invalid session id 'no spaces allowed'"),
    (["chat", "--session", "ok", "--redis", "http://127.0.0.1:6379"], "invalid Redis URL 'http://127.0.0.1:6379'"),
    (["chat", "--session", "ok", "--redis", "redis://127.0.0.1:1/0"], "cannot reach Redis at redis://127.0.0.1:1/0"),
    (["chat", "--session", "ok", "--temperature", "-1"], "invalid sampling settings temperature=-1.0"),
])
def test_bad_input_one_line_exit_2(args, fragment):
    result = run(*args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def play_file(tmp_path: Path, held_out_text: str) -> Path:
    path = tmp_path / "play.txt"
    path.write_text(held_out_text[:12_000], encoding="utf-8")
    return path


def test_run_streams_a_file_past_the_window(play_file):
    result = run("run", str(play_file), "--window", "124", "--chunk", "32", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {"model", "tokens", "perplexity", "cache_budget", "cache_entries_max",
                            "evicted_tokens", "saturation", "seconds", "session", "landmarks_written",
                            "landmarks_injected", "chunks_retrieved"}
    assert summary["cache_budget"] == 128
    assert summary["cache_entries_max"] == 128  # the window fills up before each eviction
    assert summary["evicted_tokens"] > summary["tokens"] - 128 - 32
    assert 10 < summary["perplexity"] < 500


def test_eval_ppl_reports_buckets(play_file):
    result = run("eval", "ppl", str(play_file), "--method", "recompute", "--max-tokens", "1500", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "recompute"
    assert report["tokens"] == 1500
    assert [(b["start"], b["end"]) for b in report["buckets"]] == [(1, 1025), (1025, 1500)]


@pytest.mark.parametrize("args, message", [
    (["eval", "ppl", "{file}", "--method", "sliding"], "invalid choice: 'sliding'"),
    (["run", "{file}", "--window", "300"], "does not fit the model's 256 positions"),
    (["run", "{file}", "--rope", "yarn"], "--rope yarn needs --rope-factor"),
    (["run", "{file}", "--rope", "spline", "--rope-factor", "2"], "invalid --rope 'spline'"),
    (["run", "missing.txt"], "text file 'missing.txt' not found"),
    (["run", "{empty}"], "pass a file with some text"),
    (["run", "{file}", "--rope", "bogus"], "invalid --rope 'bogus'"),
    (["run", "{file}", "--rope-factor", "2"], "has no effect with method 'none'"),
    (["run", "{file}", "--chunk", "300", "--window", "252"], "chunk (300) is larger than the window (252)"),
    (["run", "{file}", "--landmark-policy", "retrieve", "--landmarks", "2"], "needs --retrieve K"),
    (["run", "{file}", "--retrieve", "2"], "--retrieve 2 needs --landmark-policy retrieve"),
    (["run", "{file}", "--landmark-policy", "relevant"], "--landmark-policy has no effect without landmarks"),
    (["run", "{file}", "--landmark-bias", "--centroids", "2"], "--landmark-bias and --centroids have no effect"),
    (["eval", "passkey", "--method", "streaming", "--landmark-policy", "relevant"], "--method streaming does not use"),
    (["run", "{file}", "--session", "s1"], "--session and --redis store landmarks"),
    (["run", "{file}", "--landmarks", "2", "--centroids", "0"], "invalid --centroids 0"),
    (["eval", "ppl", "{file}", "--method", "streaming", "--landmarks", "4"], "--method streaming does not use"),
    (["eval", "ppl", "{file}", "--method", "landmarks"], "--method landmarks needs --landmarks L"),
    (["run", "{file}", "--landmarks", "250"], "fewer sinks, landmark or retrieval slots"),
    (["run", "{file}", "--retrieve", "-1"], "invalid --retrieve -1"),
])
def test_stream_commands_reject_bad_input(play_file, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run(*[{"{file}": str(play_file), "{empty}": str(empty)}.get(a, a) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "errors.pydantic.dev" not in result.stderr


def test_run_writes_landmarks_to_redis(play_file, redis_client):
    client, prefix = redis_client
    session = prefix.split(":")[-1]
    result = run("run", str(play_file), "--landmarks", "3", "--session", session, "--redis", REDIS_URL, "--json")
    try:
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["session"] == session
        assert summary["landmarks_injected"] == 3
        assert summary["landmarks_written"] == summary["evicted_tokens"] // 64
        assert client.zcard(f"ctxmem:{{{session}}}:landmarks") == summary["landmarks_written"]

        again = run("run", str(play_file), "--landmarks", "3", "--session", session, "--redis", REDIS_URL)
        assert again.returncode == 2
        assert "already contains landmarks" in again.stderr
        replaced = run("run", str(play_file), "--landmarks", "3", "--session", session, "--redis", REDIS_URL,
                       "--replace", "--json")
        assert replaced.returncode == 0, replaced.stderr
        assert json.loads(replaced.stdout)["landmarks_written"] == summary["landmarks_written"]
    finally:
        for key in client.scan_iter(match=f"ctxmem:{{{session}}}:*"):
            client.delete(key)
        client.zrem("ctxmem:sessions", session)


def test_run_retrieve_stores_chunks_beside_landmarks(play_file, redis_client):
    client, prefix = redis_client
    session = prefix.split(":")[-1]
    result = run("run", str(play_file), "--landmark-policy", "retrieve", "--retrieve", "2", "--chunk", "32",
                 "--session", session, "--redis", REDIS_URL, "--json")
    try:
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["chunks_retrieved"] == 2
        assert summary["saturation"]["retrieved"] == 64
        assert summary["cache_budget"] == 256
        written = summary["evicted_tokens"] // 32
        assert summary["landmarks_written"] == written
        assert client.zcard(f"ctxmem:{{{session}}}:chunks") == written
    finally:
        for key in client.scan_iter(match=f"ctxmem:{{{session}}}:*"):
            client.delete(key)
        client.zrem("ctxmem:sessions", session)


def chat(session: str, prefix: str, lines: str) -> subprocess.CompletedProcess:
    """Run `ctxmem chat` with `lines` piped to stdin, in a session under a test prefix."""
    return subprocess.run(CTXMEM + ["chat", "--session", session, "--redis", REDIS_URL, "--prefix", prefix,
                                    "--max-new-tokens", "8"],
                          input=lines, capture_output=True, text=True, timeout=300)


def test_chat_resumes_in_a_new_process(redis_client):
    client, prefix = redis_client
    session = f"chat-{uuid.uuid4().hex[:8]}"

    first = chat(session, prefix, "Hello there\nWho speaks next?\n")
    assert first.returncode == 0, first.stderr
    assert f"new session {session!r}" in first.stdout
    assert first.stdout.count("assistant> ") == 2
    assert sum(line.startswith("cache ") for line in first.stdout.splitlines()) == 2
    assert f"goodbye: session {session!r} has 4 messages in Redis" in first.stdout

    second = chat(session, prefix, "And then?\n")
    assert second.returncode == 0, second.stderr
    assert f"resumed session {session!r}: 4 messages" in second.stdout
    assert second.stdout.count("assistant> ") == 1
    assert "this turn encoded" in second.stdout
    assert SessionStore(client, prefix=prefix).message_count(session) == 6


def test_chat_ends_cleanly_on_ctrl_c(redis_client):
    client, prefix = redis_client
    session = f"chat-{uuid.uuid4().hex[:8]}"
    command = CTXMEM + ["chat", "--session", session, "--redis", REDIS_URL, "--prefix", prefix,
                        "--max-new-tokens", "8"]
    # A test run started in the background inherits SIGINT ignored; the chat must get the default.
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        process.stdin.write("Hello there\n")
        process.stdin.flush()
        for line in process.stdout:  # wait for the first reply's saturation line
            if line.startswith("cache "):
                break
        process.send_signal(signal.SIGINT)  # while chat waits for the next line
        # stdin stays open, so only the signal can end the chat (communicate() would close it,
        # and a chat that read that end of input first would never see Ctrl-C).
        process.wait(timeout=60)
        rest, errors = process.stdout.read(), process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, errors
    assert "interrupted" in rest
    assert f"goodbye: session {session!r} has 2 messages in Redis" in rest
    assert SessionStore(client, prefix=prefix).message_count(session) == 2


def test_demo_second_run_finds_the_sessions(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "CTXMEM_REDIS_URL"}
    env["CTXMEM_HOME"] = str(tmp_path)  # a private embedded Redis and data file
    options = ["--sessions", "2", "--turns", "2"]

    first = run("demo", *options, "--json", env=env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["found"] == []
    assert report["redis"] == f"embedded server, data file {tmp_path / 'embedded-redis.db'}"
    assert [row["session"] for row in report["sessions"]] == ["tempest-1-of-2", "tempest-2-of-2"]
    for row in report["sessions"]:
        assert row["messages"] == 1 + 2 * 2 * 2  # the system message, then 2 rounds of 2 turns
        assert row["turns"] == 4
        assert row["landmarks_written"] == row["eviction_events"] > 0
        assert 0 < row["saturation"] <= 1
    assert len(report["landmarks"]) == sum(row["landmarks_written"] for row in report["sessions"])
    assert all(mark["token_end"] - mark["token_start"] == 32 for mark in report["landmarks"])
    assert report["pass_key"]["expected"] == "52817"
    assert (tmp_path / "embedded-redis.db").is_file()

    second = run("demo", *options, env=env)
    assert second.returncode == 0, second.stderr
    assert "found 2 sessions from an earlier run: tempest-1-of-2, tempest-2-of-2" in second.stdout
    assert "sessions in Redis under prefix 'ctxmem'" in second.stdout
    tokens_before = {row["session"]: row["tokens_seen"] for row in report["sessions"]}
    rows = [line.split() for line in second.stdout.splitlines() if line.startswith("tempest-")]
    rows = [row for row in rows if len(row) == 8 and row[4].endswith("%")]  # the sessions table
    messages = {row[0]: int(row[1]) for row in rows}
    assert messages == {"tempest-1-of-2": 17, "tempest-2-of-2": 17}
    tokens_after = {row[0]: int(row[2]) for row in rows}
    assert all(tokens_after[name] > tokens_before[name] for name in tokens_before)


def test_run_refuses_the_id_of_a_conversation(play_file, reference, redis_client):
    client, _ = redis_client
    model, tokenizer = reference
    session_id = f"chat-{uuid.uuid4().hex[:8]}"
    manager = MemoryManager(model, tokenizer, client)  # the default prefix, as `ctxmem run` uses
    try:
        manager.session(session_id).feed([{"role": "user", "content": "Hello."}])
        for replace in ([], ["--replace"]):
            result = run("run", str(play_file), "--landmarks", "2", "--session", session_id, "--redis", REDIS_URL,
                         *replace)
            assert result.returncode == 2
            assert "is a conversation" in result.stderr
        assert manager.session_store.message_count(session_id) == 1
    finally:
        manager.delete(session_id)
