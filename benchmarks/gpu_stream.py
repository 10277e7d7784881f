"""Streaming throughput and peak memory on one CUDA device: ctxmem's cache against a DynamicCache.

A 1B-class random-weight Llama config (hidden 2048, 16 layers, 32 query heads, 8 KV heads,
intermediate 8192, vocabulary 32,000, 4,096 positions) runs in bfloat16; speed and memory do
not depend on the weights. Each system streams the same random token ids:

- ctxmem: a `Stream` with 4 sinks and a window of the remaining 4,092 positions, chunk 64,
  fed in pieces of one chunk, for all --tokens (100,000 by default);
- plain transformers: a `DynamicCache` fed the same pieces at absolute positions. Its memory
  and per-token attention grow with the stream, and positions past 4,096 are outside the
  model's range. It stops at --plain-cap tokens or after --plain-seconds, whichever comes first,
  and the table shows which limit stopped it.

At 1,000 and 10,000 streamed tokens and at the end, each system decodes --decode-tokens tokens
one at a time; the table gives the median milliseconds per token there, the ingest rate in
tokens per second, and the peak of torch.cuda.max_memory_allocated. `benchmarks/gpu.sh` runs it.
Without CUDA the script exits with an error; `--device cpu --tiny` is a dry run of every code
path on a small config, for tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from ctxmem.config import CacheConfig
from ctxmem.stream import Stream

HERE = Path(__file__).parent
SINKS, CHUNK = 4, 64
CHECKPOINTS = (1_000, 10_000)  # streamed tokens at which decoding is timed, besides the end


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (only with --tiny)")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens streamed through ctxmem")
    parser.add_argument("--plain-cap", type=int, default=32_768,
                        help="tokens at most streamed into the DynamicCache")
    parser.add_argument("--plain-seconds", type=float, default=90.0,
                        help="seconds at most spent streaming into the DynamicCache")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded one at a time per timing")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer config with 128 positions instead of the 1B-class one (dry run)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_stream.json")
    args = parser.parse_args(argv)
    for flag, value in (("--tokens", args.tokens), ("--plain-cap", args.plain_cap),
                        ("--decode-tokens", args.decode_tokens)):
        if value < 1:
            parser.error(f"invalid {flag} {value}; use 1 or more")
    return args


def check_device(args: argparse.Namespace) -> torch.device:
    """Return the device to run on; print a one-line error and exit with code 2 when it cannot be used."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} needs a CUDA GPU, but torch {torch.__version__} sees none; "
             "run this on a machine with a GPU, or pass --device cpu --tiny for a dry run")
    if device.type == "cpu" and not args.tiny:
        fail("the 1B-class config on the CPU would take hours; pass --tiny for a dry run, or use --device cuda")
    return device


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32_000, max_position_embeddings=4096)


def make_model(config: LlamaConfig, device: torch.device) -> torch.nn.Module:
    """Build the random-weight model directly on `device`, in bfloat16 on CUDA and float32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class Run:
    """One system's stream: ingest in pieces, timed decodes at checkpoints, and the totals."""

    def __init__(self, name: str, feed: Callable[[list[int]], None], entries: Callable[[], int],
                 device: torch.device, vocab: int):
        self.name, self.feed, self.entries, self.device = name, feed, entries, device
        self.generator = torch.Generator().manual_seed(1)
        self.vocab = vocab
        self.streamed = 0
        self.ingested = 0  # tokens fed in pieces, the decoded ones excluded
        self.ingest_seconds = 0.0
        self.decode_ms: dict[int, float] = {}
        self.stopped_by = "all tokens"

    def ids(self, count: int) -> list[int]:
        return torch.randint(10, self.vocab, (count,), generator=self.generator).tolist()

    def ingest(self, count: int) -> None:
        ids = self.ids(count)
        synchronize(self.device)
        started = time.perf_counter()
        for start in range(0, count, CHUNK):
            self.feed(ids[start:start + CHUNK])
        synchronize(self.device)
        self.ingest_seconds += time.perf_counter() - started
        self.streamed += count
        self.ingested += count

    def decode(self, count: int) -> None:
        """Time `count` single-token forwards (the decode step of generation); they join the stream."""
        times = []
        for token in self.ids(count):
            synchronize(self.device)
            started = time.perf_counter()
            self.feed([token])
            synchronize(self.device)
            times.append(time.perf_counter() - started)
        self.streamed += count
        self.decode_ms[self.streamed] = 1e3 * statistics.median(times)


@torch.no_grad()
def stream(run: Run, total: int, decode_tokens: int, deadline: float | None = None) -> None:
    """Stream `total` tokens through `run`, decoding one at a time at CHECKPOINTS and at the end.

    Stops early at `deadline` (a time.perf_counter() value) when one is given.
    """
    for target in [*[point for point in CHECKPOINTS if point < total], total]:
        while run.streamed < target - decode_tokens:
            if deadline is not None and time.perf_counter() > deadline:
                run.stopped_by = "time limit"
                run.decode(decode_tokens)
                return
            run.ingest(min(16 * CHUNK, target - decode_tokens - run.streamed))
        run.decode(decode_tokens)


def ctxmem_run(model, device: torch.device, capacity: int) -> Run:
    pipe = Stream(model, CacheConfig(sinks=SINKS, window=capacity - SINKS, chunk=CHUNK))
    return Run("ctxmem (4 sinks + window)", lambda ids: pipe.feed(ids), lambda: pipe.cache.length, device,
               model.config.vocab_size)


def plain_run(model, device: torch.device) -> Run:
    cache = DynamicCache(config=model.config)

    def feed(ids: list[int]) -> None:
        model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True, logits_to_keep=1)

    return Run("transformers DynamicCache", feed, lambda: cache.get_seq_length(), device, model.config.vocab_size)


def measure(args: argparse.Namespace) -> dict:
    device = check_device(args)
    config = model_config(args.tiny)
    model = make_model(config, device)
    capacity = config.max_position_embeddings
    parameters = sum(p.numel() for p in model.parameters())
    rows = []

    for build, total, limited in ((lambda: ctxmem_run(model, device, capacity), args.tokens, False),
                                  (lambda: plain_run(model, device), min(args.tokens, args.plain_cap), True)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run = build()
        deadline = time.perf_counter() + args.plain_seconds if limited else None
        stream(run, total, args.decode_tokens, deadline)
        if limited and run.stopped_by == "all tokens" and total < args.tokens:
            run.stopped_by = f"--plain-cap {args.plain_cap}"
        rows.append({"system": run.name, "streamed": run.streamed, "stopped_by": run.stopped_by,
                     "cache_entries": run.entries(),
                     "ingest_tokens_per_s": run.ingested / max(run.ingest_seconds, 1e-9),
                     "decode_ms": run.decode_ms, "peak_bytes": peak_bytes(device)})
        del run
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "parameters": parameters, "capacity": capacity, "tiny": args.tiny,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "rows": rows}


def print_table(result: dict) -> None:
    table = Table("system", "streamed tokens", "stopped by", "cache entries", "ingest tokens/s",
                  "decode ms/token (after N streamed)", "peak memory",
                  title=f"streaming on {result['device']}: {result['parameters'] / 1e9:.2f} B parameters, "
                        f"{result['dtype']}, {result['capacity']} positions")
    for row in result["rows"]:
        decode = ", ".join(f"{ms:.2f} @ {streamed:,}" for streamed, ms in row["decode_ms"].items())
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f} GiB"
        table.add_row(row["system"], f"{row['streamed']:,}", row["stopped_by"], f"{row['cache_entries']:,}",
                      f"{row['ingest_tokens_per_s']:,.0f}", decode, peak)
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    result = measure(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"took {result['seconds']} s; JSON in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
