"""Landmark store latency on loopback Redis, and the time landmarks take out of a stream.

1. Put and get latency (p50, p99) of `LandmarkStore`. The records are mean landmarks
   [layers, kv_heads, 1, head_dim] and 64-token chunks [layers, kv_heads, 64, head_dim] with
   their token ids, of the reference model's shape and of a 1B-class shape (16 layers, 8 KV
   heads, head_dim 64) in bfloat16 and float32. Each call is timed whole, so the
   checksum, msgpack encoding and decoding are included with the round trips. A last row puts
   landmarks with a TTL, where every put refreshes the TTL of every key of the session.
2. The share of streaming time spent in `LandmarkMemory.add` while the reference model
   streams a held-out play, with landmarks recomputed over [sinks + chunk] (`source="recompute"`)
   and taken from the window (`source="window"`), both written to Redis, against the same
   stream without landmarks. The stream is fed as a prefill (pieces of 512 tokens) and token by
   token, as generation feeds it. Wall-clock and process CPU time are both recorded, and the
   runs are interleaved and repeated, because other work on a shared machine skews wall-clock
   time.

All keys go under a fresh prefix and are deleted at the end. Prints one table and writes
benchmarks/results/landmark_store.json. Run: `.venv/bin/python benchmarks/landmark_store.py`
(about 1.5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import redis
import torch
from rich.console import Console
from rich.table import Table

from ctxmem import load_model
from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.reference import corpus
from ctxmem.rope import rotary_spec
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.records import Chunk, Landmark, ModelFingerprint
from ctxmem.stream import Stream

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
CHUNK_TOKENS = 64
SINKS, LANDMARK_SLOTS = 4, 4
PREFILL_PIECE = 512  # tokens per feed call in the prefill runs; Stream splits them into chunks


@dataclass(frozen=True)
class RecordShape:
    """The KV shape of a model whose landmarks and chunks are timed."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self, entries: int) -> str:
        return f"{self.name} [{self.layers}, {self.kv_heads}, {entries}, {self.head_dim}] {self.dtype_name}"


SHAPES = [
    RecordShape("reference", layers=2, kv_heads=2, head_dim=32, dtype=torch.float32),
    RecordShape("1B-class", layers=16, kv_heads=8, head_dim=64, dtype=torch.bfloat16),
    RecordShape("1B-class", layers=16, kv_heads=8, head_dim=64, dtype=torch.float32),
]


@dataclass
class LatencyRow:
    """Put and get latency of one kind of record, in milliseconds."""

    record: str
    blob_bytes: int
    count: int
    put_p50_ms: float
    put_p99_ms: float
    get_p50_ms: float | None
    get_p99_ms: float | None


@dataclass
class ShareRow:
    """Time spent in `LandmarkMemory.add`, and in the store's put within it, out of one stream's time.

    Each time is measured twice: wall-clock seconds, and CPU seconds of this process, which other
    work on the machine inflates much less.
    """

    source: str  # "recompute", "window", or "none" for the stream without landmarks
    feeding: str  # "prefill" or "token by token"
    repeat: int
    tokens: int
    landmarks: int
    stream_wall_s: float
    stream_cpu_s: float
    add_wall_s: float = 0.0
    add_cpu_s: float = 0.0
    put_wall_s: float = 0.0

    @property
    def cpu_share(self) -> float:
        return self.add_cpu_s / self.stream_cpu_s

    @property
    def wall_share(self) -> float:
        return self.add_wall_s / self.stream_wall_s


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis to measure (loopback)")
    parser.add_argument("--count", type=int, default=1000, help="landmark puts and gets per shape")
    parser.add_argument("--chunk-count", type=int, default=200, help="chunk puts and gets per shape")
    parser.add_argument("--play", default="the-tempest", choices=corpus.HELD_OUT_PLAYS)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the play streamed as a prefill")
    parser.add_argument("--decode-tokens", type=int, default=1024,
                        help="tokens fed one at a time after a 256-token prefill")
    parser.add_argument("--repeats", type=int, default=3, help="streams per source and feeding, interleaved")
    # With more threads, OpenMP workers that spin-wait between operations add CPU seconds that
    # are not work, so the CPU-time shares are cleanest with one thread.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    return parser.parse_args()


def percentile_ms(seconds: list[float], percent: int) -> float:
    """Return the `percent`-th percentile of `seconds`, in milliseconds."""
    return 1e3 * statistics.quantiles(seconds, n=100, method="inclusive")[percent - 1]


def timed(operation: Callable[[], object]) -> float:
    started = time.perf_counter()
    operation()
    return time.perf_counter() - started


# Part 1: store latency


def fingerprint_for(shape: RecordShape) -> ModelFingerprint:
    """Build a fingerprint of a model of `shape`, with placeholder hashes because the store only compares them."""
    return ModelFingerprint(architecture="LlamaForCausalLM", model_type="llama", config_hash="0" * 64,
                            weights_hash="0" * 64, layers=shape.layers, kv_heads=shape.kv_heads,
                            head_dim=shape.head_dim, dtype=shape.dtype_name)


def random_kv(shape: RecordShape, entries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values, each [layers, kv_heads, entries, head_dim]."""
    generator = torch.Generator().manual_seed(seed)
    size = (shape.layers, shape.kv_heads, entries, shape.head_dim)
    return torch.randn(size, generator=generator).to(shape.dtype), torch.randn(size, generator=generator).to(shape.dtype)


def make_landmarks(shape: RecordShape, session_id: str, count: int) -> list[Landmark]:
    """`count` mean landmarks of one chunk each, all with the same tensors but their own index."""
    keys, values = random_kv(shape, 1, seed=0)  # [layers, kv_heads, 1, head_dim]
    fingerprint = fingerprint_for(shape)
    return [Landmark.from_tensors(session_id=session_id, index=index, token_start=CHUNK_TOKENS * index,
                                  token_end=CHUNK_TOKENS * (index + 1), text="x" * 256, fingerprint=fingerprint,
                                  keys=keys, values=values)
            for index in range(count)]


def make_chunk(shape: RecordShape, session_id: str, index: int) -> Chunk:
    keys, values = random_kv(shape, CHUNK_TOKENS, seed=index)  # [layers, kv_heads, 64, head_dim]
    return Chunk.from_tensors(session_id=session_id, index=index, token_start=CHUNK_TOKENS * index,
                              fingerprint=fingerprint_for(shape), keys=keys, values=values,
                              token_ids=torch.arange(CHUNK_TOKENS, dtype=torch.int64))


def landmark_latency(store: LandmarkStore, shape: RecordShape, count: int) -> LatencyRow:
    """Time `count` puts of new landmarks into one session, then `count` gets of them."""
    session_id = f"landmarks-{shape.name}-{shape.dtype_name}"
    landmarks = make_landmarks(shape, session_id, count)
    puts = [timed(functools.partial(store.put, landmark)) for landmark in landmarks]
    gets = [timed(functools.partial(store.get, session_id, index)) for index in range(count)]
    store.delete(session_id)
    return LatencyRow(f"landmark, {shape.describe(1)}", len(landmarks[0].to_blob()), count,
                      percentile_ms(puts, 50), percentile_ms(puts, 99), percentile_ms(gets, 50),
                      percentile_ms(gets, 99))


def chunk_latency(store: LandmarkStore, shape: RecordShape, count: int, batch: int = 25) -> LatencyRow:
    """Time `count` chunk puts and gets, deleting every `batch` chunks so Redis contains at most `batch`.

    A float32 1B-class chunk is 4 MiB, so keeping all of them would put GBs into a shared Redis.
    """
    session_id = f"chunks-{shape.name}-{shape.dtype_name}"
    puts, gets, blob_bytes = [], [], 0
    for first in range(0, count, batch):
        indices = range(first, min(first + batch, count))
        for index in indices:
            chunk = make_chunk(shape, session_id, index)  # built outside the timing
            blob_bytes = len(chunk.to_blob())
            puts.append(timed(functools.partial(store.put_chunk, chunk)))
        gets += [timed(functools.partial(store.get_chunk, session_id, index)) for index in indices]
        store.delete(session_id)
    return LatencyRow(f"chunk, {shape.describe(CHUNK_TOKENS)} + token ids", blob_bytes, count,
                      percentile_ms(puts, 50), percentile_ms(puts, 99), percentile_ms(gets, 50),
                      percentile_ms(gets, 99))


def ttl_latency(client: redis.Redis, prefix: str, count: int) -> tuple[LatencyRow, dict]:
    """Time puts into one session with ttl_seconds set; return the row and the mean of the first and last 100.

    With a TTL, the put script refreshes the TTL of every key of the session, so a put's cost
    grows with the number of landmarks the session already has.
    """
    store = LandmarkStore(client, prefix=prefix, ttl_seconds=3600)
    shape = SHAPES[0]
    session_id = "landmarks-ttl"
    puts = [timed(functools.partial(store.put, landmark)) for landmark in make_landmarks(shape, session_id, count)]
    store.delete(session_id)
    window = min(100, count)
    growth = {"first_100_mean_ms": 1e3 * statistics.mean(puts[:window]),
              "last_100_mean_ms": 1e3 * statistics.mean(puts[-window:])}
    row = LatencyRow(f"landmark put with ttl_seconds=3600, {shape.describe(1)}", 0, count,
                     percentile_ms(puts, 50), percentile_ms(puts, 99), None, None)
    return row, growth


# Part 2: the share of streaming time spent building and writing landmarks


class Stopwatch:
    """Wall-clock and process CPU seconds since it was created."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


class AddTimer:
    """Seconds spent in `memory.add` and `store.put` of one stream, added up by wrapping both methods."""

    def __init__(self, memory: LandmarkMemory, store: LandmarkStore):
        self.add_wall_s = self.add_cpu_s = self.put_wall_s = 0.0
        memory.add = self._wrap(memory.add, self._add_time)  # instance attributes shadow the methods
        store.put = self._wrap(store.put, self._put_time)

    def _add_time(self, wall: float, cpu: float) -> None:
        self.add_wall_s += wall
        self.add_cpu_s += cpu

    def _put_time(self, wall: float, cpu: float) -> None:
        self.put_wall_s += wall

    @staticmethod
    def _wrap(method: Callable, record: Callable[[float, float], None]) -> Callable:
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            stopwatch = Stopwatch()
            try:
                return method(*args, **kwargs)
            finally:
                record(*stopwatch.elapsed())
        return wrapper


def feed_timed(stream: Stream, ids: list[int], token_by_token: bool) -> tuple[float, float]:
    """Feed `ids` as 512-token pieces or one token at a time; return the wall and CPU seconds."""
    step = 1 if token_by_token else PREFILL_PIECE
    stopwatch = Stopwatch()
    for start in range(0, len(ids), step):
        stream.feed(ids[start:start + step])
    return stopwatch.elapsed()


@torch.no_grad()
def stream_share(model, tokenizer, ids: list[int], source: str | None, token_by_token: bool, repeat: int,
                 client: redis.Redis, prefix: str) -> ShareRow:
    """Stream `ids` with a landmark memory of `source` (None: no memory) and time `add` within it.

    Token by token, the first 256 tokens are fed at once and untimed, so the window is full and
    evicting when the timing starts.
    """
    config = CacheConfig(sinks=SINKS, chunk=CHUNK_TOKENS, landmark_slots=LANDMARK_SLOTS)
    feeding = "token by token" if token_by_token else "prefill"
    prefill = model.config.max_position_embeddings if token_by_token else 0
    store = memory = timer = None
    if source is not None:
        store = LandmarkStore(client, prefix=prefix)
        memory = LandmarkMemory(model, rotary_spec(model), LandmarkConfig(source=source), LANDMARK_SLOTS,
                                store=store, session_id=f"stream-{source}-{repeat}", decode=tokenizer.decode)
    stream = Stream(model, config, memory=memory)
    if prefill:
        stream.feed(ids[:prefill])
    if memory is not None:
        timer = AddTimer(memory, store)
    landmarks_before = len(memory.landmarks) if memory is not None else 0

    stream_wall_s, stream_cpu_s = feed_timed(stream, ids[prefill:], token_by_token)

    row = ShareRow(source or "none", feeding, repeat, len(ids) - prefill, 0, stream_wall_s, stream_cpu_s)
    if memory is not None:
        store.delete(memory.session_id)
        row.landmarks = len(memory.landmarks) - landmarks_before
        row.add_wall_s, row.add_cpu_s, row.put_wall_s = timer.add_wall_s, timer.add_cpu_s, timer.put_wall_s
    return row


def measure_shares(args: argparse.Namespace, client: redis.Redis, prefix: str) -> list[ShareRow]:
    """Measure streams without landmarks and with each source, interleaved, `args.repeats` times."""
    model, tokenizer = load_model("reference", device="cpu", dtype="float32")
    play_ids = tokenizer.encode(corpus.load_play(args.play), add_special_tokens=True)
    runs = ((False, play_ids[:args.tokens]),
            (True, play_ids[:model.config.max_position_embeddings + args.decode_tokens]))
    stream_share(model, tokenizer, play_ids[:1024], "recompute", False, -1, client, prefix)  # warm-up
    rows = []
    for token_by_token, ids in runs:
        for repeat in range(args.repeats):
            for source in (None, "recompute", "window"):
                row = stream_share(model, tokenizer, ids, source, token_by_token, repeat, client, prefix)
                logger.info("%s, %s, repeat %d: %.2f s streaming (%.2f s CPU), %.2f s in add (%.2f s CPU)",
                            row.feeding, row.source, repeat, row.stream_wall_s, row.stream_cpu_s,
                            row.add_wall_s, row.add_cpu_s)
                rows.append(row)
    return rows


# Output


def median_of(rows: list[ShareRow], value: Callable[[ShareRow], float]) -> float:
    return statistics.median(value(row) for row in rows)


def latency_text(row: LatencyRow) -> str:
    text = f"put p50 {row.put_p50_ms:.3f} ms, p99 {row.put_p99_ms:.3f} ms"
    if row.get_p50_ms is not None:
        text += f"; get p50 {row.get_p50_ms:.3f} ms, p99 {row.get_p99_ms:.3f} ms"
    return text


def share_text(rows: list[ShareRow], baseline: list[ShareRow]) -> str:
    """Format the fastest repeat's stream times, which other work disturbed least, and the median shares."""
    cpu_s = min(row.stream_cpu_s for row in rows)
    text = f"{cpu_s:.2f} s CPU, {min(row.stream_wall_s for row in rows):.2f} s wall"
    if rows[0].source == "none":
        return text
    baseline_cpu_s = min(row.stream_cpu_s for row in baseline)
    return text + (f" ({cpu_s / baseline_cpu_s:.2f}x no landmarks, CPU); add "
                   f"{100 * median_of(rows, lambda row: row.cpu_share):.1f}% of CPU, "
                   f"{100 * median_of(rows, lambda row: row.wall_share):.1f}% of wall "
                   f"(store put {median_of(rows, lambda row: row.put_wall_s):.3f} s wall)")


def build_table(latency: list[LatencyRow], shares: list[ShareRow], threads: int) -> Table:
    table = Table("measurement", "count", "result",
                  title=f"landmark store and recomputation, {threads} torch threads, torch {torch.__version__}")
    for row in latency:
        size = f", {row.blob_bytes:,} B" if row.blob_bytes else ""
        table.add_row(row.record + size, str(row.count), latency_text(row))

    groups: dict[tuple[str, str], list[ShareRow]] = {}
    for row in shares:
        groups.setdefault((row.feeding, row.source), []).append(row)
    for (feeding, source), rows in groups.items():
        label = (f"stream {rows[0].tokens:,} tokens {feeding}, landmarks: {source} "
                 f"(times: fastest of {len(rows)}, shares: median)")
        count = f"{rows[0].landmarks} landmarks" if source != "none" else "-"
        table.add_row(label, count, share_text(rows, groups[(feeding, "none")]))
    return table


def save(path: Path, args: argparse.Namespace, latency: list[LatencyRow], ttl_growth: dict,
         shares: list[ShareRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": args.threads},
        "settings": {"count": args.count, "chunk_count": args.chunk_count, "play": args.play,
                     "prefill_tokens": args.tokens, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                     "sinks": SINKS,
                     "landmark_slots": LANDMARK_SLOTS, "chunk": CHUNK_TOKENS},
        "latency": [asdict(row) for row in latency],
        "ttl_put_growth": ttl_growth,
        "stream_share": [asdict(row) | {"cpu_share": row.cpu_share, "wall_share": row.wall_share}
                         for row in shares],
    }
    path.write_text(json.dumps(result, indent=1) + "\n")


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under `prefix`; return how many were left to delete."""
    leftover = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if leftover:
        client.delete(*leftover)
    return len(leftover)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"ctxmem-bench:{uuid.uuid4().hex[:12]}"
    try:
        store = LandmarkStore(client, prefix=prefix)
        latency = [landmark_latency(store, shape, args.count) for shape in SHAPES]
        latency += [chunk_latency(store, shape, args.chunk_count) for shape in SHAPES]
        ttl_row, ttl_growth = ttl_latency(client, prefix, args.count)
        latency.append(ttl_row)
        shares = measure_shares(args, client, prefix)
    finally:
        leftover = delete_prefix(client, prefix)
        logger.info("deleted %d leftover keys under %s", leftover, prefix)
        client.close()

    save(args.out / "landmark_store.json", args, latency, ttl_growth, shares)
    Console(width=160).print(build_table(latency, shares, args.threads))
    logger.info("TTL puts: first 100 mean %.3f ms, last 100 mean %.3f ms", ttl_growth["first_100_mean_ms"],
                ttl_growth["last_100_mean_ms"])


if __name__ == "__main__":
    main()
