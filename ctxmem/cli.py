"""The `ctxmem` command line: model information, generation, streaming, evaluation, chat, the demo
and context extension (`extend`, in ctxmem.cli_extend). `inspect` and `report` (what the memory
contains) are in ctxmem.cli_inspect.

Every command but `chat`, `report`, `inspect delete` and `inspect plot` takes `--json` for
machine-readable output. Invalid input prints a one-line error naming the value and exits with
code 2. Other expected failures, such as a session locked by another writer, print one line and
exit with code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from rich import box
from rich.console import Console
from rich.progress import Progress, TextColumn
from rich.table import Table

from ctxmem import cli_extend, cli_inspect
from ctxmem.config import PASS_KEY_METHODS, PERPLEXITY_METHODS
from ctxmem.store.keys import DEFAULT_PREFIX

logger = logging.getLogger(__name__)

USAGE_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, ConnectionError)
# The demo shows the newest landmarks of each session; --json lists them all.
LANDMARKS_SHOWN = 5


class CommandError(RuntimeError):
    """A command failed for a reason other than its input; main prints it on one line and exits with 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxmem", description="Memory beyond the context window for RoPE LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="show a model's architecture and RoPE settings")
    _add_model_options(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    generate = commands.add_parser("generate", help="continue a prompt with the model")
    _add_model_options(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="number of tokens to generate at most")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--json", action="store_true", help="print JSON instead of text")

    run = commands.add_parser("run", help="stream a text file through the model with the bounded cache")
    run.add_argument("path", help="a UTF-8 text file")
    _add_model_options(run)
    _add_cache_options(run)
    _add_landmark_options(run, storage=True)
    run.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    evaluate = commands.add_parser("eval", help="measure the model on a text")
    measures = evaluate.add_subparsers(dest="measure", required=True)
    ppl = measures.add_parser("ppl", help="perplexity of a whole text under one way of holding context")
    ppl.add_argument("path", help="a UTF-8 text file")
    ppl.add_argument("--method", default="streaming", choices=PERPLEXITY_METHODS,
                     help="dense, window (no sinks, absolute positions), streaming, recompute (the oracle), "
                          "or landmarks (streaming with --landmarks L)")
    ppl.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    _add_model_options(ppl)
    _add_cache_options(ppl)
    _add_landmark_options(ppl, storage=False)
    ppl.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_passkey_parser(measures)

    _add_chat_parser(commands)
    _add_demo_parser(commands)
    cli_extend.add_parser(commands)
    cli_inspect.add_parsers(commands)
    return parser


def _add_chat_parser(commands) -> None:
    chat = commands.add_parser("chat", help="chat in a durable session that resumes where it stopped")
    # The dests differ from `run`'s --session and --redis, which only store landmarks and are checked as such.
    chat.add_argument("--session", dest="session_id", required=True,
                      help="session id, 1 to 128 characters from A-Z, a-z, 0-9, '.', '_' and '-'")
    _add_model_options(chat)
    chat.add_argument("--redis", dest="redis_url",
                      help="Redis URL (default: $CTXMEM_REDIS_URL, else the embedded server)")
    # Documented in the README, not in --help: it keeps tests and experiments apart in one Redis.
    chat.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
    chat.add_argument("--system",
                      help="system message that opens a new session (a stored session keeps its own)")
    chat.add_argument("--max-new-tokens", type=int, default=64, help="tokens per reply at most")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed of each reply")
    _add_cache_options(chat)
    _add_landmark_options(chat, storage=False)
    chat.add_argument("--resume", default="exact", choices=["exact", "recompute"],
                      help="how a new session is resumed later: reload the stored KV of every chunk, or "
                           "store token ids only and encode the window again")


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="read a held-out play as durable sessions in fresh processes, "
                                            "then check a tool call and a pass key")
    _add_model_options(demo)
    demo.add_argument("--redis-url", help="Redis URL (default: $CTXMEM_REDIS_URL, else the embedded server)")
    demo.add_argument("--prefix", default=DEFAULT_PREFIX,
                      help="first part of every Redis key the demo writes")
    demo.add_argument("--sessions", type=int, default=3, help="sessions, each a part of the play")
    demo.add_argument("--rounds", type=int, default=2,
                      help="fresh processes per run; each resumes every session and feeds its next passages")
    demo.add_argument("--turns", type=int, default=3, help="passages fed to each session per round")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads per process; 1 suits the small reference model, "
                           "raise it for larger ones")
    demo.add_argument("--checks", action="store_true",
                      help="run only the tool call and pass-key checks, without sessions")
    demo.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _add_passkey_parser(measures) -> None:
    passkey = measures.add_parser(
        "passkey", help="pass-key accuracy with the key stated a given number of tokens before the question")
    passkey.add_argument("--method", default="streaming", choices=PASS_KEY_METHODS,
                         help="streaming, landmarks (streaming with --landmarks L), or dense: full attention at "
                              "absolute positions, which keeps every prompt token, so its memory and time grow "
                              "with the distance")
    passkey.add_argument("--distances", default="512,2048,8192,16384",
                         help="comma-separated distances, each the number of filler tokens between the "
                              "statement and the question")
    passkey.add_argument("--trials", type=int, default=10, help="prompts per distance, each with a new key")
    passkey.add_argument("--seed", type=int, default=0,
                         help="seed of the keys, filler offsets and prefix lengths")
    passkey.add_argument("--filler", help="UTF-8 text file that supplies the filler; it needs at least as many "
                                          "tokens as the largest distance (default: Hamlet, held out of training)")
    _add_model_options(passkey)
    _add_cache_options(passkey)
    _add_landmark_options(passkey, storage=False)
    passkey.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    parser.add_argument("--model", default="reference", help="'reference', a local folder or a hub id")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--rope", default="none", help="RoPE scaling: none, pi, ntk, dynamic-ntk or yarn")
    parser.add_argument("--rope-factor", type=float, default=None, help="context extension factor for --rope")


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sinks", type=int, default=4, help="leading tokens kept forever (attention sinks)")
    parser.add_argument("--window", type=int, default=None, help="recent tokens kept (default: what the model's positions leave)")
    parser.add_argument("--chunk", type=int, default=64, help="tokens evicted at a time")


def _load(args: argparse.Namespace):
    """Validate the RoPE options, then load the model and tokenizer they name."""
    from transformers.utils import logging as transformers_logging

    from ctxmem.model import load_model
    from ctxmem.rope_scaling import SCALING_METHODS, RopeScaling

    transformers_logging.disable_progress_bar()  # rich draws ctxmem's own progress

    if args.rope not in SCALING_METHODS:
        raise ValueError(f"invalid --rope {args.rope!r}; use one of: {', '.join(SCALING_METHODS)}")
    factor = args.rope_factor
    if factor is None and args.rope == "none":
        factor = 1.0
    if factor is None:
        raise ValueError(f"--rope {args.rope} needs --rope-factor F (the context extension, e.g. 4)")
    rope = RopeScaling(method=args.rope, factor=factor)
    return load_model(args.model, device=args.device, dtype=args.dtype, rope=rope)


def _add_landmark_options(parser: argparse.ArgumentParser, storage: bool) -> None:
    parser.add_argument("--landmarks", type=int, default=0, help="landmarks placed in the cache (0: none)")
    parser.add_argument("--landmark-policy", default="recent", choices=["recent", "relevant", "retrieve"],
                        help="which landmarks fill the slots: the newest, the best match for the current "
                             "queries, or retrieve whole chunks (with --retrieve K)")
    parser.add_argument("--retrieve", type=int, default=0,
                        help="chunks restored whole by --landmark-policy retrieve (each takes --chunk entries)")
    parser.add_argument("--query-tokens", type=int, default=1,
                        help="latest queries that score landmarks for the relevant and retrieve policies")
    parser.add_argument("--landmark-bias", action="store_true",
                        help="add log(tokens per entry) to the attention logits of landmark entries")
    parser.add_argument("--centroids", type=int, default=1, help="cache entries per landmark (1: the mean)")
    parser.add_argument("--landmark-source", default="recompute", choices=["recompute", "window"],
                        help="encode evicted chunks afresh, or take their KV from the window")
    if storage:
        parser.add_argument("--session", help="store the landmarks in Redis under this session id "
                                              "(without --session or --redis they stay in memory)")
        parser.add_argument("--redis", help="Redis URL (default: $CTXMEM_REDIS_URL, else the embedded server)")
        parser.add_argument("--replace", action="store_true",
                            help="delete the landmarks an earlier run stored under --session first")
        parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
        parser.add_argument("--attention-stats", action="store_true",
                            help="count per landmark the times it was injected and the attention mass it "
                                 "received, stored beside the landmarks (computes attention twice)")


def _cache_config(args: argparse.Namespace):
    from ctxmem.config import CacheConfig

    _check_landmark_options(args)
    return CacheConfig(sinks=args.sinks, window=args.window, chunk=args.chunk,
                       landmark_slots=args.landmarks * args.centroids, retrieval_slots=args.retrieve * args.chunk)


def _check_landmark_options(args: argparse.Namespace) -> None:
    """Reject landmark options that are out of range, or that would be ignored, naming the flag."""
    for flag, value, lowest in (("--landmarks", args.landmarks, 0), ("--retrieve", args.retrieve, 0),
                                ("--centroids", args.centroids, 1), ("--query-tokens", args.query_tokens, 1)):
        if value < lowest:
            raise ValueError(f"invalid {flag} {value}; use {lowest} or more")
    memory = args.landmarks > 0 or args.retrieve > 0
    if args.landmark_policy == "retrieve" and args.retrieve == 0:
        raise ValueError("--landmark-policy retrieve needs --retrieve K, the number of chunks restored whole")
    if args.retrieve and args.landmark_policy != "retrieve":
        raise ValueError(f"--retrieve {args.retrieve} needs --landmark-policy retrieve")
    tuned = [flag for flag, changed in (("--landmark-policy", args.landmark_policy != "recent"),
                                        ("--landmark-bias", args.landmark_bias),
                                        ("--centroids", args.centroids != 1),
                                        ("--landmark-source", args.landmark_source != "recompute")) if changed]
    method = getattr(args, "method", None)
    if method is not None and method != "landmarks" and (memory or tuned):
        raise ValueError(f"--method {method} does not use landmarks; drop the landmark options, or use "
                         "--method landmarks")
    if method == "landmarks" and not memory:
        raise ValueError("--method landmarks needs --landmarks L (or --landmark-policy retrieve --retrieve K)")
    if tuned and not memory:
        raise ValueError(f"{' and '.join(tuned)} {'has' if len(tuned) == 1 else 'have'} no effect without "
                         "landmarks; add --landmarks L (or --retrieve K with the retrieve policy)")
    if not memory and (getattr(args, "session", None) or getattr(args, "redis", None)):
        raise ValueError("--session and --redis store landmarks; add --landmarks L (or --retrieve K)")
    if getattr(args, "attention_stats", False) and not (getattr(args, "session", None) or getattr(args, "redis", None)):
        raise ValueError("--attention-stats stores its counts beside the landmarks in Redis; add --session ID")


def _landmark_config(args: argparse.Namespace):
    from ctxmem.config import LandmarkConfig

    return LandmarkConfig(policy=args.landmark_policy, centroids=args.centroids, source=args.landmark_source,
                          retrieve=args.retrieve, bias=args.landmark_bias, query_tokens=args.query_tokens,
                          attention_stats=getattr(args, "attention_stats", False))


def _landmark_memory(args: argparse.Namespace, model, tokenizer, config):
    """Return the LandmarkMemory `run` streams with, writing to Redis, or None without --landmarks."""
    from ctxmem.landmarks.memory import LandmarkMemory
    from ctxmem.rope import rotary_spec
    from ctxmem.store.keys import validate_session_id
    from ctxmem.store.landmarks import LandmarkStore
    from ctxmem.store.sessions import SessionStore

    if args.landmarks == 0 and args.retrieve == 0:
        return None
    stored = args.session is not None or args.redis is not None
    session_id = validate_session_id(args.session or f"run-{uuid.uuid4().hex[:12]}")
    store = LandmarkStore(args.redis, prefix=args.prefix) if stored else None
    if store is not None and SessionStore(store.client, prefix=store.keys.prefix).exists(session_id):
        raise ValueError(f"session {session_id!r} is a conversation (ctxmem chat or MemoryManager), and its "
                         "landmarks belong to it; pass another --session id")
    if store is not None and (store.indices(session_id) or store.chunk_indices(session_id)):
        if not args.replace:
            raise ValueError(f"session {session_id!r} already contains landmarks from an earlier run; pass another "
                             "--session id, or --replace to delete them first")
        store.delete(session_id)
    return LandmarkMemory(model, rotary_spec(model), _landmark_config(args), config.landmark_slots, store=store,
                          session_id=session_id, decode=tokenizer.decode)


def _read_ids(path: str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Tokenize a text file, led by BOS as conversations and training sequences are."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{path!r} is a folder; pass the path of a UTF-8 text file")
    if not file.is_file():
        raise FileNotFoundError(f"text file {path!r} not found; pass the path of a UTF-8 text file")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"invalid --max-tokens {max_tokens}; use 2 or more")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {path!r} is not UTF-8 ({error.reason} at byte {error.start}); "
                         "convert it to UTF-8 first") from error
    ids = tokenizer.encode(text, add_special_tokens=True)
    if len(ids) < 2:
        raise ValueError(f"text file {path!r} contains no text ({len(ids) - 1} tokens); pass a file with some text")
    return ids[:max_tokens] if max_tokens else ids


@contextmanager
def _progress(console: Console, total: int, label: str, quiet: bool, unit: str = "tokens"):
    """A rich progress bar over `total` units (silent for --json); yields an advance(n) callback."""
    with Progress(*Progress.get_default_columns(), TextColumn(f"{{task.completed}} {unit}"), console=console,
                  disable=quiet, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def run_info(args: argparse.Namespace, console: Console) -> None:

    model, tokenizer = _load(args)
    config = model.config
    fields = {
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "attention_heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
        "head_dim": getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": config.rope_parameters,
        "vocab_size": len(tokenizer),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    if args.json:
        console.print_json(json.dumps(fields))
        return
    table = Table("field", "value", title=f"model {args.model}")
    for key, value in fields.items():
        table.add_row(key, str(value))
    console.print(table)


def run_generate(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.generation import check_sampling, generate_ids

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    model, tokenizer = _load(args)
    prompt_ids = tokenizer.encode(args.prompt)
    ids = generate_ids(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    text = tokenizer.decode(ids)
    if args.json:
        console.print_json(json.dumps({"prompt": args.prompt, "completion": text, "new_tokens": len(ids)}))
    else:
        console.print(args.prompt + text, markup=False, highlight=False)


def run_demo(args: argparse.Namespace, console: Console) -> None:
    """Feed the demo's sessions in fresh processes, report them, then run the two checks.

    Redis connects and the model loads before any worker starts, so that bad options fail
    early. The checks at the end reuse the model.
    """
    import torch

    from ctxmem.demo import Demo, DemoOptions, DemoWorkerError, describe_redis, run_checks

    started = time.perf_counter()
    options = DemoOptions(model=args.model, device=args.device, dtype=args.dtype,
                          rope=(args.rope, args.rope_factor or 1.0), redis_url=args.redis_url,
                          prefix=args.prefix, sessions=args.sessions, rounds=args.rounds, turns=args.turns,
                          threads=args.threads)
    demo = Demo(options)
    torch.set_num_threads(args.threads)
    model, tokenizer = _load(args)
    result: dict = {"redis": describe_redis(demo.client), "model": args.model}
    if not args.json:
        console.print(f"model: {args.model}\nRedis: {result['redis']}", soft_wrap=True)
    if not args.checks:
        result.update(prefix=args.prefix, found=demo.existing(), rounds=args.rounds, turns=args.turns)
        if not args.json:
            console.print(_found_line(result["found"], args), soft_wrap=True)
        feed_started = time.perf_counter()
        try:
            with _demo_progress(console, options, args.json) as on_event:
                demo.feed(on_event)
        except DemoWorkerError as error:
            raise CommandError(str(error)) from error
        result["feed_seconds"] = round(time.perf_counter() - feed_started, 1)
        result.update(demo.report())
        if not args.json:
            _print_sessions(console, result, args)
    result.update(run_checks(model, tokenizer))
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        console.print_json(json.dumps(result))
        return
    _print_checks(console, result)


def _found_line(found: list[str], args: argparse.Namespace) -> str:
    if found:
        return (f"found {_counted(len(found), 'session')} from an earlier run: {', '.join(found)}; "
                "continuing each where it stopped")
    return (f"no sessions from an earlier run under prefix {args.prefix!r}; "
            f"starting {_counted(args.sessions, 'new session')}")


def _counted(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


@contextmanager
def _demo_progress(console: Console, options, quiet: bool):
    """A rich progress bar over the demo's turns; yields the callback for the workers' events."""
    total = options.sessions * options.rounds * options.turns
    with Progress(*Progress.get_default_columns(), TextColumn("{task.completed} turns"), console=console,
                  disable=quiet, transient=True) as progress:
        task = progress.add_task("starting", total=total)
        current = {"round": 0}

        def on_event(event: dict) -> None:
            if event.get("event") == "start":
                current["round"] = event["round"]
            round_label = f"round {current['round']}/{options.rounds}"
            if event.get("event") == "start":
                progress.update(task, description=f"{round_label}: starting a process")
            elif event.get("event") == "ready":
                progress.update(task, description=f"{round_label}: resuming sessions")
            elif event.get("event") == "turn":
                progress.update(task, advance=1, description=f"{round_label}: {event['session']}")

        yield on_event


def _print_sessions(console: Console, result: dict, args: argparse.Namespace) -> None:
    """Print the sessions table and the newest landmarks of each session."""
    console.print(f"fed every session {args.turns} passages in each of {args.rounds} fresh processes "
                  f"in {result['feed_seconds']} s")
    headers = ("session", "messages", "tokens seen", "saturation", "evicted tokens", "evictions", "landmarks")
    rows = [(row["session"], str(row["messages"]), str(row["tokens_seen"]),
             f"{row['entries_used']}/{row['budget']} {row['saturation']:.0%}", str(row["evicted_tokens"]),
             str(row["eviction_events"]), str(row["landmarks_written"])) for row in result["sessions"]]
    # Each column is as wide as its longest value or header word, so headers wrap and values
    # never do, and the table fits in 80 columns.
    table = Table(title=f"sessions in Redis under prefix {args.prefix!r}", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for position, header in enumerate(headers):
        width = max([len(word) for word in header.split()] + [len(row[position]) for row in rows])
        table.add_column(header, justify="left" if position == 0 else "right", width=width)
    for row in rows:
        table.add_row(*row)
    console.print()
    console.print(table)

    landmarks = result["landmarks"]
    newest = []
    for session in result["sessions"]:
        own = [landmark for landmark in landmarks if landmark["session"] == session["session"]]
        newest += own[-LANDMARKS_SHOWN:]
    title = f"saved landmarks: the newest {LANDMARKS_SHOWN} of each session"
    if len(newest) < len(landmarks):
        title += f" ({len(landmarks) - len(newest)} older ones in --json)"
    rows = [(landmark["session"], str(landmark["index"]), f"{landmark['token_start']}-{landmark['token_end']}",
             " / ".join(line.strip() for line in landmark["text"].splitlines() if line.strip())[:50])
            for landmark in newest]
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    widths = [max([len(header)] + [len(row[position]) for row in rows])
              for position, header in enumerate(("session", "index", "tokens"))]
    for position, header in enumerate(("session", "index", "tokens")):
        table.add_column(header, justify="left" if position == 0 else "right", width=widths[position])
    # The text takes what the console leaves after the other columns and the 2-character gaps.
    text_width = max(10, min(50, console.width - sum(widths) - 2 * len(widths)))
    table.add_column("source text", width=text_width, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print()
    console.print(table)


def _print_checks(console: Console, result: dict) -> None:
    table = Table("role", "content", title="chat with a tool call", show_lines=True)
    console.print()
    for message in result["chat"]:
        table.add_row(message["role"], message["text"])
    console.print(table)
    console.print(f"pass key stated {result['pass_key']['distance']} tokens before the question: "
                  f"expected {result['pass_key']['expected']}, model answered {result['pass_key']['answer']!r}",
                  soft_wrap=True)
    console.print(f"the demo took {result['seconds']} s after Python's start-up and imports")


def _session_settings(args: argparse.Namespace):
    """Return the SessionSettings that the cache, landmark and --resume options ask for."""
    from ctxmem.session import SessionSettings

    landmarks = _landmark_config(args) if args.landmarks or args.retrieve else None
    return SessionSettings(cache=_cache_config(args), landmarks=landmarks, resume=args.resume)


def _describe_settings(settings) -> str:
    cache = settings.cache
    window = "auto" if cache.window is None else cache.window
    memory = "no landmarks"
    if settings.landmarks is not None:
        memory = f"landmark policy {settings.landmarks.policy} in {cache.landmark_slots} slots"
    return f"sinks {cache.sinks}, window {window}, chunk {cache.chunk}, {memory}, {settings.resume} resume"


# Options of `chat` that set up a new session; a stored session keeps the settings it was created with.
SESSION_OPTIONS = ("sinks", "window", "chunk", "landmarks", "landmark_policy", "retrieve", "query_tokens",
                   "landmark_bias", "centroids", "landmark_source", "resume")


def _given_session_options(args: argparse.Namespace) -> list[str]:
    """Return the session options (as --flags) that the command line sets to other than their defaults."""
    defaults = build_parser().parse_args(["chat", "--session", args.session_id])
    return ["--" + name.replace("_", "-") for name in SESSION_OPTIONS
            if getattr(args, name) != getattr(defaults, name)]


def run_chat(args: argparse.Namespace, console: Console) -> None:
    """Chat in a session stored in Redis: replies stream, and each turn is committed as it ends."""
    from ctxmem.generation import check_sampling
    from ctxmem.manager import MemoryManager
    from ctxmem.store.connection import connect
    from ctxmem.store.keys import validate_prefix, validate_session_id
    from ctxmem.store.sessions import SessionLockError

    session_id = validate_session_id(args.session_id)
    validate_prefix(args.prefix)
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    settings = _session_settings(args)
    client = connect(args.redis_url)
    model, tokenizer = _load(args)
    manager = MemoryManager(model, tokenizer, client, prefix=args.prefix, settings=settings)
    existed = manager.exists(session_id)
    session = manager.session(session_id)
    _print_chat_start(console, session, existed, settings, args)
    try:
        _chat_loop(console, session, args)
    except SessionLockError as error:
        raise CommandError(str(error)) from error
    stored = manager.session_store.message_count(session_id)
    console.print(f"goodbye: session {session_id!r} has {stored} messages in Redis")


def _print_chat_start(console: Console, session, existed: bool, settings, args: argparse.Namespace) -> None:
    if not existed:
        console.print(f"new session {session.session_id!r} ({_describe_settings(settings)})", soft_wrap=True)
    else:
        saturation = session.saturation()
        console.print(f"resumed session {session.session_id!r}: {len(session.records)} messages, "
                      f"{saturation.tokens_seen} tokens seen, "
                      f"cache {saturation.entries_used}/{saturation.budget} ({saturation.fraction:.0%}), "
                      f"{saturation.evicted_tokens} tokens evicted", soft_wrap=True)
        ignored = _given_session_options(args)
        if args.system is not None:
            ignored.append("--system")
        if ignored:
            console.print(f"{' and '.join(ignored)} ignored: the session keeps the messages and settings "
                          f"it was created with ({_describe_settings(session.settings)})",
                          style="dim", soft_wrap=True)
    if sys.stdin.isatty():
        console.print("[dim]Type a message and press Enter; Ctrl-D or Ctrl-C ends the chat.[/dim]")


def _chat_loop(console: Console, session, args: argparse.Namespace) -> None:
    """Answer each user line until end of input or Ctrl-C, which both end the chat normally."""
    try:
        for text in _user_lines(console):
            if text.strip():
                _chat_turn(console, session, text, args)
    except KeyboardInterrupt:
        console.print()
        console.print("interrupted")


def _user_lines(console: Console):
    """Yield the user's lines: prompted on a terminal, else as they arrive on stdin (a pipe or a file)."""
    if sys.stdin.isatty():
        while True:
            try:
                yield console.input("[bold]you>[/bold] ")
            except EOFError:
                console.print()
                return
    for line in sys.stdin:
        text = line.rstrip("\r\n")
        console.print(f"you> {text}", markup=False, highlight=False, soft_wrap=True)
        yield text


def _chat_turn(console: Console, session, text: str, args: argparse.Namespace) -> None:
    """Send the stored conversation plus `text`, print the reply as it streams, then its saturation."""
    messages = [record["message"] for record in session.records]
    if not messages and args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": text})
    console.out("assistant> ", end="", highlight=False)
    pieces = session.stream_tokens(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, seed=args.seed)
    try:
        for piece in pieces:
            console.out(piece, end="", highlight=False)
            console.file.flush()
    except KeyboardInterrupt:
        console.print()
        console.print("the unfinished reply and its user message are not saved")
        raise
    finally:
        pieces.close()  # after an interruption, this ends the turn without a commit
    console.out("")
    console.print(_saturation_line(session), style="dim", markup=False, highlight=False, soft_wrap=True)


def _saturation_line(session) -> str:
    saturation, usage = session.saturation(), session.last_reply.usage
    memory = session.stream.memory
    stored = len(memory.landmarks) if memory is not None else 0
    return (f"cache {saturation.entries_used}/{saturation.budget} ({saturation.fraction:.0%}), "
            f"{saturation.evicted_tokens} tokens evicted, {stored} landmarks stored "
            f"({saturation.landmarks} in the cache); this turn encoded {usage.encoded_tokens} tokens "
            f"and reused {usage.cached_tokens}")


def run_run(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.eval.perplexity import streaming_nll
    from ctxmem.stream import Stream

    config = _cache_config(args)
    model, tokenizer = _load(args)
    ids = _read_ids(args.path, tokenizer)
    memory = _landmark_memory(args, model, tokenizer, config)
    stream = Stream(model, config, memory=memory)
    started = time.perf_counter()
    with _progress(console, len(ids), f"streaming {Path(args.path).name}", args.json) as advance:
        nll = streaming_nll(model, ids, config, advance, stream=stream)
    if memory is not None:
        memory.flush_usage()
    saturation = stream.saturation()
    summary = {
        "model": args.model, "tokens": len(ids), "perplexity": math.exp(nll.mean().item()),
        "cache_budget": saturation.budget, "cache_entries_max": saturation.peak_entries, "evicted_tokens": saturation.evicted_tokens,
        "saturation": saturation.model_dump(), "seconds": round(time.perf_counter() - started, 3),
        "session": memory.session_id if memory and memory.store else None,
        "landmarks_written": memory.written if memory else 0,
        "landmarks_injected": memory.injected if memory else 0,
        "chunks_retrieved": memory.retrieved if memory else 0,
    }
    if args.json:
        console.print_json(json.dumps(summary))
        return
    table = Table("field", "value", title=f"streamed {args.path}")
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{name} {number:.3f}" if isinstance(number, float) else f"{name} {number}"
                              for name, number in value.items())
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


def run_eval(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.eval.perplexity import evaluate

    config = _cache_config(args)
    model, tokenizer = _load(args)
    ids = _read_ids(args.path, tokenizer, args.max_tokens)
    with _progress(console, len(ids), f"{args.method} perplexity", args.json) as advance:
        result = evaluate(model, ids, args.method, config, progress=advance, landmarks=_landmark_config(args))
    if args.json:
        console.print_json(result.model_dump_json())
        return
    table = Table("tokens", "perplexity", title=f"{args.method}: perplexity {result.perplexity:.2f} over {result.tokens} tokens")
    for bucket in result.buckets:
        table.add_row(f"{bucket.start}-{bucket.end}", f"{bucket.perplexity:.2f}")
    console.print(table)


def _parse_distances(text: str) -> list[int]:
    """Parse --distances "512,2048" into token counts, rejecting non-integers, values below 1 and repeats."""
    distances: list[int] = []
    for part in text.split(","):
        try:
            distance = int(part.strip())
        except ValueError:
            raise ValueError(f"invalid --distances entry {part.strip()!r} in {text!r}; pass whole numbers of "
                             "tokens separated by commas, such as 512,2048") from None
        if distance < 1:
            raise ValueError(f"invalid --distances entry {distance}; use distances of 1 or more tokens")
        if distance in distances:
            raise ValueError(f"distance {distance} is listed twice in --distances {text!r}; "
                             "list each distance once")
        distances.append(distance)
    return distances


def _filler_ids(path: str | None, tokenizer) -> list[int]:
    """Tokenize the filler file without BOS, or by default the first held-out play."""
    from ctxmem.reference import corpus

    if path is None:
        return tokenizer.encode(corpus.load_play(corpus.HELD_OUT_PLAYS[0]), add_special_tokens=False)
    ids = _read_ids(path, tokenizer)
    return ids[1:] if ids[0] == tokenizer.bos_token_id else ids


def run_eval_passkey(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.eval.passkey import evaluate

    distances = _parse_distances(args.distances)
    if args.trials < 1:
        raise ValueError(f"invalid --trials {args.trials}; use 1 or more")
    if args.filler is not None and not Path(args.filler).exists():
        raise FileNotFoundError(f"filler file {args.filler!r} not found; pass the path of a UTF-8 text file, "
                                "or omit --filler to use the held-out play")
    config = _cache_config(args)
    model, tokenizer = _load(args)
    filler_ids = _filler_ids(args.filler, tokenizer)
    total = args.trials * len(distances)
    with _progress(console, total, f"{args.method} pass key", args.json, unit="trials") as advance:
        result = evaluate(model, tokenizer, filler_ids, args.method, config, landmarks=_landmark_config(args),
                          distances=distances, trials=args.trials, seed=args.seed, progress=advance)
    if args.json:
        console.print_json(result.model_dump_json(include={"method", "distances"}))
        return
    table = Table("distance", "accuracy", "trials", title=f"{args.method}: pass-key accuracy")
    for entry in result.distances:
        table.add_row(str(entry.distance), f"{entry.accuracy:.0%}", str(entry.trials))
    console.print(table)


EVAL_MEASURES: dict[str, Callable[[argparse.Namespace, Console], None]] = {
    "ppl": run_eval,
    "passkey": run_eval_passkey,
}


def run_measure(args: argparse.Namespace, console: Console) -> None:
    EVAL_MEASURES[args.measure](args, console)


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], None]] = {
    "info": run_info,
    "generate": run_generate,
    "run": run_run,
    "eval": run_measure,
    "chat": run_chat,
    "demo": run_demo,
    "extend": cli_extend.run,
    **cli_inspect.COMMANDS,
}


def _describe(error: Exception) -> str:
    """Return the message of `error`; a pydantic ValidationError becomes its errors, without the noise."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        text = item["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {text}" if field else text)
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        COMMANDS[args.command](args, console)
    except USAGE_ERRORS as error:
        _print_error(error)
        return 2
    except CommandError as error:
        _print_error(error)
        return 1
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    return 0


def _print_error(error: Exception) -> None:
    message = " ".join(_describe(error).split())
    Console(stderr=True, soft_wrap=True).print(f"error: {message}", markup=False, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
