"""Cost of attention statistics, and the time to list 10,000 landmarks.

1. Attention statistics: the reference model streams a held-out play with 4 landmark slots and
   chunk 32, landmarks written to Redis, once with `LandmarkConfig(attention_stats=False)` and
   once with True, for the `recent` policy (where the statistics alone install ctxmem's
   attention function) and the `relevant` policy (which already runs it). Prefill feeds
   `--tokens` tokens; token by token feeds `--decode-tokens` tokens one at a time after an
   untimed 256-token prefill, as generation does. The configurations take turns within each of
   `--repeats` rounds, so other work on the machine slows them alike; the table shows the best
   round, in tokens per wall-clock second and per CPU second of this process.
2. Listing: a session of 10,000 landmarks with reference-model tensors ([2, 2, 1, 32] float32)
   is written with pipelined SETs, then listed whole with `Inspector.landmarks`, one page of 100
   from the middle, and whole through the CLI code (`ctxmem inspect landmarks --json --limit 0`
   run in this process, output discarded, so interpreter start-up is not counted). Median of
   `--repeats` runs.

All keys go under a fresh prefix and are deleted at the end. Prints one table per part and
writes benchmarks/results/inspect.json. Run: `.venv/bin/python benchmarks/inspect_memory.py`
(about 3 minutes on 2 shared CPU cores). The file is not named inspect.py, because a script's
folder comes first on sys.path and would shadow the standard library's `inspect`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import time
import uuid
from pathlib import Path

import redis
import torch
import transformers
from rich.console import Console
from rich.table import Table

from ctxmem.cli import main
from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.fingerprint import model_fingerprint
from ctxmem.inspect import Inspector
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.model import load_model
from ctxmem.reference import corpus
from ctxmem.rope import rotary_spec
from ctxmem.store.keys import KeySchema
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.records import Landmark
from ctxmem.stream import Stream

HERE = Path(__file__).parent
LISTED = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis to measure (loopback)")
    parser.add_argument("--play", default="the-tempest", choices=corpus.HELD_OUT_PLAYS)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens streamed as a prefill")
    parser.add_argument("--decode-tokens", type=int, default=512, help="tokens fed one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; configurations take turns in each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    return parser.parse_args()


# Part 1: attention statistics


def stream_for(model, tokenizer, store: LandmarkStore, policy: str, stats: bool) -> Stream:
    session_id = f"bench-{uuid.uuid4().hex[:8]}"
    config = LandmarkConfig(policy=policy, attention_stats=stats)
    memory = LandmarkMemory(model, rotary_spec(model), config, slots=4, store=store, session_id=session_id,
                            decode=tokenizer.decode)
    return Stream(model, CacheConfig(chunk=32, landmark_slots=4), memory=memory)


def time_stream(model, tokenizer, store, ids: list[int], policy: str, stats: bool, feeding: str) -> dict:
    """Feed `ids` as a prefill or one token at a time; return tokens, wall and CPU seconds."""
    stream = stream_for(model, tokenizer, store, policy, stats)
    timed_ids = ids
    if feeding == "token by token":
        stream.feed(ids[:256])
        timed_ids = ids[256:]
    wall, cpu = time.perf_counter(), time.process_time()
    if feeding == "prefill":
        stream.feed(timed_ids)
    else:
        for token in timed_ids:
            stream.feed([token])
    stream.memory.flush_usage()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    store.delete(stream.memory.session_id)
    return {"tokens": len(timed_ids), "wall_s": wall, "cpu_s": cpu, "landmarks": len(stream.memory.landmarks)}


def measure_stats(args, model, tokenizer, store: LandmarkStore) -> list[dict]:
    ids = tokenizer.encode(corpus.load_play(args.play))
    prefill_ids, decode_ids = ids[:args.tokens], ids[:256 + args.decode_tokens]
    cases = [(feeding, policy, stats) for feeding in ("prefill", "token by token") for policy in ("recent", "relevant")
             for stats in (False, True)]
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for round_number in range(args.repeats):
        for case in cases:
            feeding, policy, stats = case
            source = prefill_ids if feeding == "prefill" else decode_ids
            runs[case].append(time_stream(model, tokenizer, store, source, policy, stats, feeding))
        print(f"attention statistics: round {round_number + 1} of {args.repeats} done", flush=True)
    rows = []
    for (feeding, policy, stats), results in runs.items():
        tokens = results[0]["tokens"]
        rows.append({"feeding": feeding, "policy": policy, "attention_stats": stats, "tokens": tokens,
                     "landmarks": results[0]["landmarks"],
                     "tokens_per_s_wall": max(tokens / run["wall_s"] for run in results),
                     "tokens_per_s_cpu": max(tokens / run["cpu_s"] for run in results), "runs": results})
    return rows


# Part 2: listing


def write_session(client: redis.Redis, prefix: str, session_id: str, fingerprint) -> None:
    """Write LISTED landmarks of the reference model's shape, pipelined, as the store lays them out."""
    keys = KeySchema(prefix)
    generator = torch.Generator().manual_seed(0)
    pipeline = client.pipeline(transaction=False)
    for index in range(LISTED):
        tensors = torch.randn(2, 2, 2, 1, 32, generator=generator)  # keys and values [layers, kv_heads, 1, head_dim]
        landmark = Landmark.from_tensors(session_id=session_id, index=index, token_start=4 + 32 * index,
                                         token_end=36 + 32 * index, text=f"landmark {index}: " + "words " * 20,
                                         fingerprint=fingerprint, keys=tensors[0], values=tensors[1])
        pipeline.set(keys.landmark(session_id, index), landmark.to_blob())
        pipeline.zadd(keys.landmarks(session_id), {str(index): index})
        if index % 1000 == 999:
            pipeline.execute()
    pipeline.hset(keys.meta(session_id), mapping={"schema_version": 1, "fingerprint": fingerprint.model_dump_json()})
    pipeline.execute()


def measure_listing(args, client: redis.Redis, prefix: str, fingerprint) -> list[dict]:
    write_session(client, prefix, "listed", fingerprint)
    inspector = Inspector(client, prefix)
    operations = {
        "Inspector.landmarks, all 10,000": lambda: inspector.landmarks("listed"),
        "Inspector.landmarks, 100 from offset 5,000": lambda: inspector.landmarks("listed", offset=5_000, limit=100),
        "ctxmem inspect landmarks --json --limit 0 (in process)": lambda: cli_listing(args, prefix),
    }
    rows = []
    for name, operation in operations.items():
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            operation()
            seconds.append(time.perf_counter() - started)
        rows.append({"operation": name, "median_s": statistics.median(seconds), "runs_s": seconds})
    return rows


def cli_listing(args, prefix: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["inspect", "landmarks", "listed", "--redis", args.redis_url, "--prefix", prefix,
                     "--json", "--limit", "0"])
    if code != 0 or len(json.loads(out.getvalue())["landmarks"]) != LISTED:
        raise RuntimeError(f"the CLI listing failed with exit code {code}")


def print_tables(stats_rows: list[dict], listing_rows: list[dict]) -> None:
    console = Console(width=120)
    table = Table("feeding", "policy", "attention stats", "tokens", "landmarks", "tokens/s (wall)",
                  "tokens/s (CPU)", "vs off (CPU)", title="attention statistics on the reference model")
    baseline = {(row["feeding"], row["policy"]): row["tokens_per_s_cpu"] for row in stats_rows
                if not row["attention_stats"]}
    for row in stats_rows:
        ratio = row["tokens_per_s_cpu"] / baseline[(row["feeding"], row["policy"])]
        table.add_row(row["feeding"], row["policy"], "on" if row["attention_stats"] else "off", str(row["tokens"]),
                      str(row["landmarks"]), f"{row['tokens_per_s_wall']:.0f}", f"{row['tokens_per_s_cpu']:.0f}",
                      f"{ratio:.2f}x")
    console.print(table)
    listing = Table("operation", "median", title=f"listing a session of {LISTED:,} landmarks")
    for row in listing_rows:
        listing.add_row(row["operation"], f"{row['median_s']:.3f} s")
    console.print(listing)


def main_benchmark() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"ctxmem-bench:{uuid.uuid4().hex[:12]}"
    model, tokenizer = load_model("reference", device="cpu", dtype="float32")
    store = LandmarkStore(client, prefix=prefix)
    try:
        stats_rows = measure_stats(args, model, tokenizer, store)
        listing_rows = measure_listing(args, client, prefix, model_fingerprint(model))
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    print_tables(stats_rows, listing_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": args.threads, "repeats": args.repeats,
              "attention_stats": stats_rows, "listing": listing_rows}
    (args.out / "inspect.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main_benchmark()
