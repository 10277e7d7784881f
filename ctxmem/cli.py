"""The `ctxmem` command line: model information, generation and the demo.

Every command takes `--json` for machine-readable output. Invalid input prints a one-line
error naming the value and exits with code 2.
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

from rich.console import Console
from rich.progress import Progress, TextColumn
from rich.table import Table

from ctxmem.config import PASS_KEY_METHODS, PERPLEXITY_METHODS

logger = logging.getLogger(__name__)

USAGE_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, ConnectionError)


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

    demo = commands.add_parser("demo", help="run the main job on the reference model")
    _add_model_options(demo)
    demo.add_argument("--redis-url", help="Redis URL (default: $CTXMEM_REDIS_URL, else the embedded server)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


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


def _cache_config(args: argparse.Namespace):
    from ctxmem.config import CacheConfig

    if args.landmarks < 0:
        raise ValueError(f"invalid --landmarks {args.landmarks}; use 0 (none) or more")
    if args.retrieve < 0:
        raise ValueError(f"invalid --retrieve {args.retrieve}; use 0 (none) or more chunks")
    return CacheConfig(sinks=args.sinks, window=args.window, chunk=args.chunk,
                       landmark_slots=args.landmarks * args.centroids, retrieval_slots=args.retrieve * args.chunk)


def _landmark_config(args: argparse.Namespace):
    from ctxmem.config import LandmarkConfig

    return LandmarkConfig(policy=args.landmark_policy, centroids=args.centroids, source=args.landmark_source,
                          retrieve=args.retrieve, bias=args.landmark_bias, query_tokens=args.query_tokens)


def _landmark_memory(args: argparse.Namespace, model, tokenizer, config):
    """Return the LandmarkMemory `run` streams with, writing to Redis, or None without --landmarks."""
    from ctxmem.landmarks.memory import LandmarkMemory
    from ctxmem.rope import rotary_spec
    from ctxmem.store.keys import validate_session_id
    from ctxmem.store.landmarks import LandmarkStore

    if args.landmarks == 0 and args.retrieve == 0:
        return None
    stored = args.session is not None or args.redis is not None
    session_id = validate_session_id(args.session or f"run-{uuid.uuid4().hex[:12]}")
    store = LandmarkStore(args.redis) if stored else None
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
    from ctxmem.demo import run

    result = run(model_name=args.model, device=args.device, dtype=args.dtype, redis_url=args.redis_url)
    if args.json:
        console.print_json(json.dumps(result))
        return
    console.print(f"Redis: {result['redis']}   model: {result['model']}")
    table = Table("role", "content", title="chat with a tool call", show_lines=True)
    for message in result["chat"]:
        table.add_row(message["role"], message["text"])
    console.print(table)
    console.print(f"pass key stated {result['pass_key']['distance']} tokens before the question: "
                  f"expected {result['pass_key']['expected']}, model answered {result['pass_key']['answer']!r}")


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
    "demo": run_demo,
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
        message = " ".join(_describe(error).split())
        Console(stderr=True, soft_wrap=True).print(f"error: {message}", markup=False, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
