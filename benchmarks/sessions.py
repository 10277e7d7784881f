"""Session resume on the reference model: resume time, bytes stored per token, and quality after resume.

A held-out play becomes a conversation: a system message, then user messages of `--words`
words each. For each resume mode ("exact", "recompute") and each stop point k, one session
is fed turns 1..k through `Session.feed`, one commit per turn, with landmarks on. Then:

1. Storage: the `MEMORY USAGE` (SAMPLES 0) of every key of the session, found by SCAN and
   split by kind (messages, state, landmarks, chunks, other), divided by the tokens seen.
   The shared `{prefix}:sessions` index is left out.
2. Resume time in this process: a new `MemoryManager` and `manager.session(id)`, which loads
   the session from Redis, timed `--repeats` times. The sessions of both modes at one stop
   point take turns within each repeat, so other work on the machine slows both alike.
3. Resume in a new process: a child process (this script with a hidden argument) imports
   ctxmem, loads the model and resumes the session. It reports wall-clock timestamps, so the
   time from process start to a resumed session includes interpreter start and imports.
4. Quality: the child scores the next `--follow-turns` turns on its resumed stream, and this
   process scores the same token ids on the stream of the session it fed, which never
   stopped. Both call the same function, which feeds each turn's token ids to
   `Stream.feed(score=True)` with the session's writes to Redis switched off. The result is
   the perplexity of those turns, the largest |difference| of the next-token logits at the
   resume point and after each turn, and the largest |difference| of the per-token losses.

All keys go under a fresh prefix and are deleted at the end. Prints one table, writes
benchmarks/results/sessions.json, and exits with an error when an exact resume's logits differ
by more than 1e-4. Run: `.venv/bin/python benchmarks/sessions.py` (about 2
minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import torch
from rich.console import Console
from rich.table import Table

from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.manager import MemoryManager
from ctxmem.model import load_model
from ctxmem.reference import corpus
from ctxmem.session import Session, SessionSettings
from ctxmem.store.keys import KeySchema
from ctxmem.transcript import Renderer, parse_messages

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
MODES = ("exact", "recompute")
CACHE = CacheConfig(chunk=32, landmark_slots=4)
SYSTEM_MESSAGE = "You answer questions about plays."
KINDS = ("messages", "state", "landmarks", "chunks", "other")
EXACT_TOLERANCE = 1e-4  # max |logit difference| allowed for an exact resume in float32


@dataclass
class Storage:
    """Bytes a session keeps in Redis, by kind: `MEMORY USAGE` and, for strings and lists, the payload."""

    keys: int
    memory_usage: dict[str, int]
    payload: dict[str, int]  # STRLEN of strings, summed element lengths of lists, 0 for other types

    @property
    def total(self) -> int:
        return sum(self.memory_usage.values())


@dataclass
class Scores:
    """Per-token losses of the scored turns and the next-token logits at the start and after each turn."""

    nll: list[torch.Tensor]  # one [turn tokens] tensor per turn
    next_logits: list[torch.Tensor]  # [vocab] each, len(nll) + 1 of them

    @property
    def perplexity(self) -> float:
        return math.exp(torch.cat(self.nll).mean().item())


@dataclass
class NewProcess:
    """Seconds from the start of a child process to each step of its resume, by wall clock."""

    imported_s: float  # interpreter start and imports of torch, transformers and ctxmem
    loaded_s: float  # ... and load_model("reference")
    resumed_s: float  # ... and MemoryManager(...).session(id)

    @property
    def resume_s(self) -> float:
        return self.resumed_s - self.loaded_s


@dataclass
class Row:
    """Every measurement of one mode and stop point."""

    mode: str
    stop_turn: int
    tokens_seen: int
    evicted_tokens: int
    landmarks: int
    feed_s: float  # wall seconds to feed turns 1..k, one commit per turn
    resume_s: list[float]  # same process, one per repeat
    new_process: NewProcess | None  # None until the resume in a child process has run
    storage: Storage
    scored_tokens: int = 0
    ppl_never_stopped: float = 0.0
    ppl_resumed: float = 0.0
    turn_ratios: list[float] = field(default_factory=list)  # resumed / never stopped, per scored turn
    max_logit_diff: float = 0.0  # over the next-token logits at the resume point and after each turn
    max_nll_diff: float = 0.0  # over the loss of every scored token

    @property
    def ratio(self) -> float:
        return self.ppl_resumed / self.ppl_never_stopped


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis to store the sessions in")
    parser.add_argument("--play", default="the-tempest", choices=corpus.HELD_OUT_PLAYS)
    parser.add_argument("--words", type=int, default=80, help="words of the play per user message")
    parser.add_argument("--stops", type=int, nargs="+", default=[10, 30, 60],
                        help="turns after which a session is stopped and resumed")
    parser.add_argument("--follow-turns", type=int, default=10, help="turns scored after the resume point")
    parser.add_argument("--repeats", type=int, default=5, help="timed resumes in this process per session")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the child")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    # Internal: the JSON job of a child process that resumes one session (see resume_in_child).
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


# The conversation


def build_conversation(play: str, turns: int, words: int) -> list[dict]:
    """Return a system message and `turns` user messages of `words` consecutive words of `play`."""
    parts = corpus.load_play(play).split()
    if len(parts) < turns * words:
        raise ValueError(f"{play} has {len(parts)} words, too few for {turns} messages of {words} words. "
                         "Lower --stops, --follow-turns or --words")
    messages = [{"role": "system", "content": SYSTEM_MESSAGE}]
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(parts[turn * words:(turn + 1) * words])})
    return messages


def follow_up_ids(tokenizer, messages: list[dict], stop_turn: int, turns: int) -> list[list[int]]:
    """Return the token ids each of the `turns` user messages after turn `stop_turn` adds.

    These are the ids that `Session.feed` would encode for those turns: the chat template's
    rendering of each message after the ones before it. Message 0 is the system message, so
    turn t is message t.
    """
    parsed = parse_messages(messages[:stop_turn + 1 + turns])
    return Renderer(tokenizer).deltas(parsed, stop_turn + 1)


def settings_for(mode: str) -> SessionSettings:
    return SessionSettings(cache=CACHE, landmarks=LandmarkConfig(), resume=mode)


def feed_turns(session: Session, messages: list[dict], turns: int) -> float:
    """Feed turns 1..`turns` to `session` one `feed` call (and commit) each; return the wall seconds."""
    started = time.perf_counter()
    for turn in range(1, turns + 1):
        session.feed(messages[:turn + 1])
    return time.perf_counter() - started


# Storage


def measure_storage(client: redis.Redis, keys: KeySchema, session_id: str) -> Storage:
    """Sum `MEMORY USAGE` and payload bytes of every key of the session, by kind."""
    base = keys.session_base(session_id)
    memory_usage = dict.fromkeys(KINDS, 0)
    payload = dict.fromkeys(KINDS, 0)
    count = 0
    for key in client.scan_iter(match=base + "*", count=1000):
        kind = key_kind(key.decode()[len(base):])
        memory_usage[kind] += client.memory_usage(key, samples=0)
        payload[kind] += payload_bytes(client, key)
        count += 1
    return Storage(count, memory_usage, payload)


def key_kind(suffix: str) -> str:
    """Map a key's part after the session base ("landmark:3", "chunks", "state") to one of KINDS."""
    name = suffix.split(":", 1)[0]
    if name in ("landmark", "landmarks"):
        return "landmarks"
    if name in ("chunk", "chunks"):
        return "chunks"
    return name if name in ("messages", "state") else "other"


def payload_bytes(client: redis.Redis, key: bytes) -> int:
    """Return the bytes of a string value or of a list's elements, or 0 for sorted sets and hashes."""
    kind = client.type(key).decode()
    if kind == "string":
        return client.strlen(key)
    if kind == "list":
        return sum(len(element) for element in client.lrange(key, 0, -1))
    return 0


# Resume and scoring


def resume(model, tokenizer, client: redis.Redis, prefix: str, session_id: str) -> Session:
    """Open a stored session as a new process would: a new manager, whose `session` loads it from Redis."""
    return MemoryManager(model, tokenizer, client, prefix=prefix).session(session_id)


def time_resumes(model, tokenizer, client: redis.Redis, prefix: str, session_ids: list[str],
                 repeats: int) -> tuple[dict[str, list[float]], dict[str, Session]]:
    """Resume each session `repeats` times; return the wall seconds of each resume and the last sessions.

    The sessions take turns within each repeat, so that other work on the machine slows all of
    them alike and their ratios stay comparable.
    """
    seconds: dict[str, list[float]] = {session_id: [] for session_id in session_ids}
    sessions: dict[str, Session] = {}
    for _ in range(repeats):
        for session_id in session_ids:
            started = time.perf_counter()
            sessions[session_id] = resume(model, tokenizer, client, prefix, session_id)
            seconds[session_id].append(time.perf_counter() - started)
    return seconds, sessions


def stop_writing(session: Session) -> None:
    """Switch off the stream's writes to Redis, so that scoring leaves the stored session as it is.

    Scoring feeds the stream directly, without a turn, so nothing is committed. Without this,
    the evictions during scoring would still store landmarks and, in exact mode, chunks. The
    switch does not change what the stream computes.
    """
    session.stream.on_chunk = None
    if session.stream.memory is not None:
        session.stream.memory.store = None


def score_turns(session: Session, turns: list[list[int]]) -> Scores:
    """Switch off the session's writes, then feed each turn's token ids to its stream with per-token loss."""
    stop_writing(session)
    stream = session.stream
    # The stream's next-token logits are private, but they are what a resumed session restores.
    next_logits = [stream._next_logits.clone()]
    nll = []
    for ids in turns:
        result = stream.feed(ids, score=True)
        nll.append(result.nll)
        next_logits.append(result.next_logits.clone())
    return Scores(nll, next_logits)


def compare(row: Row, never_stopped: Scores, resumed: Scores) -> None:
    """Fill the quality fields of `row` from the scores of the same turns on both streams."""
    row.scored_tokens = sum(len(losses) for losses in never_stopped.nll)
    row.ppl_never_stopped, row.ppl_resumed = never_stopped.perplexity, resumed.perplexity
    row.turn_ratios = [math.exp(b.mean().item() - a.mean().item())
                       for a, b in zip(never_stopped.nll, resumed.nll)]
    row.max_logit_diff = max((a - b).abs().max().item()
                             for a, b in zip(never_stopped.next_logits, resumed.next_logits))
    row.max_nll_diff = max((a - b).abs().max().item() for a, b in zip(never_stopped.nll, resumed.nll))


# The child process


def resume_in_child(job: dict) -> None:
    """Resume one session in this fresh process, score the turns after it, and save the result.

    `job` contains the Redis URL, prefix, session id, token ids of the turns to score, thread
    count, the parent's spawn time and the output path. The timestamps are wall-clock
    (time.time), comparable with the parent's.
    """
    imported = time.time()
    torch.set_num_threads(job["threads"])
    model, tokenizer = load_model("reference", device="cpu", dtype="float32")
    loaded = time.time()
    client = redis.Redis.from_url(job["redis_url"])
    session = resume(model, tokenizer, client, job["prefix"], job["session_id"])
    resumed = time.time()
    scores = score_turns(session, job["turns"])
    client.close()
    spawned = job["spawned"]
    torch.save({"imported_s": imported - spawned, "loaded_s": loaded - spawned,
                "resumed_s": resumed - spawned, "nll": scores.nll, "next_logits": scores.next_logits},
               job["out"])


def resume_in_new_process(args: argparse.Namespace, prefix: str, session_id: str,
                          turns: list[list[int]]) -> tuple[NewProcess, Scores]:
    """Run `resume_in_child` in a new Python process and return its timings and scores."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "child.pt"
        job = {"redis_url": args.redis_url, "prefix": prefix, "session_id": session_id, "turns": turns,
               "threads": args.threads, "out": str(out), "spawned": time.time()}
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
        environment = dict(os.environ, HF_HUB_OFFLINE="1")
        completed = subprocess.run(command, capture_output=True, text=True, env=environment)
        if completed.returncode != 0:
            raise RuntimeError(f"the child process resuming {session_id!r} failed with exit status "
                               f"{completed.returncode}:\n{completed.stderr[-3000:]}")
        result = torch.load(out, weights_only=True)
    timing = NewProcess(result["imported_s"], result["loaded_s"], result["resumed_s"])
    return timing, Scores(result["nll"], result["next_logits"])


# One stop point


def measure_stop(args: argparse.Namespace, model, tokenizer, client: redis.Redis, prefix: str,
                 messages: list[dict], stop_turn: int) -> list[Row]:
    """Feed one new session per mode to `stop_turn`; measure their storage, resume and the turns after it."""
    session_ids = {mode: f"{mode}-turn{stop_turn}" for mode in MODES}
    rows, sessions = {}, {}
    for mode, session_id in session_ids.items():
        manager = MemoryManager(model, tokenizer, client, prefix=prefix, settings=settings_for(mode))
        sessions[mode] = manager.session(session_id)
        feed_s = feed_turns(sessions[mode], messages, stop_turn)
        storage = measure_storage(client, manager.session_store.keys, session_id)
        stream = sessions[mode].stream
        rows[mode] = Row(mode, stop_turn, stream.tokens_seen, stream.cache.evicted_tokens,
                         len(stream.memory.landmarks), feed_s, [], None, storage)

    resume_s, resumed = time_resumes(model, tokenizer, client, prefix, list(session_ids.values()),
                                     args.repeats)
    turns = follow_up_ids(tokenizer, messages, stop_turn, args.follow_turns)
    for mode, session_id in session_ids.items():
        check_resumed(session_id, resumed[session_id], sessions[mode])
        rows[mode].resume_s = resume_s[session_id]
        rows[mode].new_process, resumed_scores = resume_in_new_process(args, prefix, session_id, turns)
        compare(rows[mode], score_turns(sessions[mode], turns), resumed_scores)
        log_row(rows[mode])
    return list(rows.values())


def check_resumed(session_id: str, resumed: Session, original: Session) -> None:
    """Raise RuntimeError when a resumed session has seen fewer or more tokens than the one that was fed."""
    if resumed.stream.tokens_seen != original.stream.tokens_seen:
        raise RuntimeError(f"{session_id}: resumed with {resumed.stream.tokens_seen} tokens seen, "
                           f"expected {original.stream.tokens_seen}")


def log_row(row: Row) -> None:
    logger.info("%s after turn %d: %d tokens, resume %.3f s, %.0f B/token, ppl %.4f vs %.4f, "
                "max |logit diff| %.2e", row.mode, row.stop_turn, row.tokens_seen,
                statistics.median(row.resume_s), row.storage.total / row.tokens_seen, row.ppl_never_stopped,
                row.ppl_resumed, row.max_logit_diff)


# Output


def per_token(row: Row, kind: str | None = None) -> str:
    total = row.storage.total if kind is None else row.storage.memory_usage[kind]
    return f"{total / row.tokens_seen:,.0f}"


def build_table(rows: list[Row], args: argparse.Namespace) -> Table:
    table = Table("mode", "after turn", "tokens seen", "resume s, same process (median)",
                  "new process: start to resumed s (resume alone)", "B/token all", "messages", "state",
                  "landmarks", "chunks", f"ppl next {args.follow_turns} turns: never stopped", "resumed",
                  "ratio (1st turn)", "max |logit diff|", "max |token loss diff|",
                  title=(f"session resume, reference model float32, {args.threads} torch thread(s), "
                         f"{args.words}-word messages of {args.play}, chunk {CACHE.chunk}, "
                         f"{CACHE.landmark_slots} landmark slots"))
    for row in rows:
        new = row.new_process
        table.add_row(row.mode, str(row.stop_turn), f"{row.tokens_seen:,}",
                      f"{statistics.median(row.resume_s):.3f}",
                      f"{new.resumed_s:.2f} ({new.resume_s:.3f})", per_token(row), per_token(row, "messages"),
                      per_token(row, "state"), per_token(row, "landmarks"), per_token(row, "chunks"),
                      f"{row.ppl_never_stopped:.4f}", f"{row.ppl_resumed:.4f}",
                      f"{row.ratio:.5f} ({row.turn_ratios[0]:.5f})", f"{row.max_logit_diff:.2e}",
                      f"{row.max_nll_diff:.2e}")
    return table


def check_exact(rows: list[Row]) -> list[str]:
    """Return a message for every exact row whose logits differ by more than EXACT_TOLERANCE."""
    failed = [row for row in rows if row.mode == "exact" and row.max_logit_diff > EXACT_TOLERANCE]
    return [f"exact resume after turn {row.stop_turn}: max |logit diff| {row.max_logit_diff:.3e} "
            f"> {EXACT_TOLERANCE}" for row in failed]


def save(path: Path, args: argparse.Namespace, rows: list[Row], wall_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
        "settings": {"play": args.play, "words": args.words, "stops": args.stops,
                     "follow_turns": args.follow_turns, "repeats": args.repeats, "cache": CACHE.model_dump(),
                     "landmarks": LandmarkConfig().model_dump(), "system_message": SYSTEM_MESSAGE},
        "wall_s": wall_s,
        "rows": [asdict(row) | {"ratio": row.ratio, "resume_median_s": statistics.median(row.resume_s),
                                "new_process_resume_s": row.new_process.resume_s,
                                "bytes_per_token": row.storage.total / row.tokens_seen}
                 for row in rows],
    }
    path.write_text(json.dumps(result, indent=1) + "\n")


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under `prefix`; return how many there were."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    return len(keys)


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("reference", device="cpu", dtype="float32")
    messages = build_conversation(args.play, max(args.stops) + args.follow_turns, args.words)
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"ctxmem-bench:{uuid.uuid4().hex[:12]}"
    try:
        rows = [row for stop in sorted(args.stops)
                for row in measure_stop(args, model, tokenizer, client, prefix, messages, stop)]
        rows.sort(key=lambda row: MODES.index(row.mode))  # stable, so each mode keeps its stop order
    finally:
        logger.info("deleted %d keys under %s", delete_prefix(client, prefix), prefix)
        client.close()

    wall_s = time.perf_counter() - started
    save(args.out / "sessions.json", args, rows, wall_s)
    Console(width=240).print(build_table(rows, args))
    logger.info("wall time %.0f s", wall_s)
    failures = check_exact(rows)
    if failures:
        raise SystemExit("\n".join(failures))


def main() -> None:
    args = parse_args()
    if args.child:
        resume_in_child(json.loads(args.child))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ctxmem").setLevel(logging.WARNING)  # each resume logs at INFO
    run(args)


if __name__ == "__main__":
    main()
