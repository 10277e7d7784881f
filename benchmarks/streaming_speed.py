"""Decode speed and memory of the streaming cache, as ratios measured side by side in one run.

1. Per-token decode time of ctxmem's cache at capacity 1,024 (full and evicting) against plain
   transformers with a DynamicCache of the same length.
2. The same against a sliding window with re-computation at window 1,024 (every token encodes
   the sinks and the last window afresh), the StreamingLLM paper's baseline.
3. Per-token decode time and peak RSS after 100k streamed tokens against after 1k, each in its
   own child process so that peak RSS belongs to one stream length.
The model is a random-weight Llama config (8 layers, hidden 512, GQA); speed does not depend on
the weights. Run: `.venv/bin/python benchmarks/streaming_speed.py` (about 5 minutes, 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from ctxmem.config import CacheConfig
from ctxmem.stream import Stream

CAPACITY, SINKS, CHUNK = 1024, 4, 64


def make_model() -> torch.nn.Module:
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=8192, max_position_embeddings=CAPACITY)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def token_ids(count: int, seed: int = 0) -> list[int]:
    return torch.randint(10, 8000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def per_token(step, tokens: int) -> list[float]:
    """Seconds per call of `step(i)` for i in range(tokens)."""
    times = []
    for i in range(tokens):
        started = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - started)
    return times


@torch.no_grad()
def ctxmem_decode(model, prefill: int, tokens: int) -> list[float]:
    stream = Stream(model, CacheConfig(sinks=SINKS, window=CAPACITY - SINKS, chunk=CHUNK))
    stream.feed(token_ids(prefill))
    new = token_ids(tokens, seed=1)
    return per_token(lambda i: stream.feed([new[i]]), tokens)


@torch.no_grad()
def dynamic_decode(model, prefill: int, tokens: int) -> list[float]:
    cache = DynamicCache(config=model.config)
    model(torch.tensor([token_ids(prefill)]), cache=cache, use_cache=True, logits_to_keep=1)
    new = token_ids(tokens, seed=1)
    return per_token(lambda i: model(torch.tensor([[new[i]]]), cache=cache, use_cache=True), tokens)


@torch.no_grad()
def recompute_decode(model, tokens: int) -> list[float]:
    history = token_ids(CAPACITY)

    def step(i: int) -> None:
        history.append(i + 10)
        window = history[:SINKS] + history[-(CAPACITY - SINKS):]
        model(torch.tensor([window]), logits_to_keep=1)

    return per_token(step, tokens)


def child(streamed: int, tokens: int) -> None:
    """Stream `streamed` tokens, time decoding, and print JSON with the median and peak RSS."""
    model = make_model()
    times = ctxmem_decode(model, streamed, tokens)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"median_s": statistics.median(times), "peak_rss_mib": peak_kib / 1024}))


def run_child(streamed: int, tokens: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", str(streamed), "--tokens", str(tokens), "--threads", str(threads)]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="decode steps timed per measurement")
    parser.add_argument("--long", type=int, default=100_000, help="tokens streamed before the long measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        return child(args.child, args.tokens)

    model = make_model()
    rows = []
    # Decode time against a DynamicCache holding the same number of entries, twice, interleaved.
    ours, plain = [], []
    for _ in range(2):
        ours += ctxmem_decode(model, CAPACITY - args.tokens, args.tokens)  # fills up to capacity, no eviction
        plain += dynamic_decode(model, CAPACITY - args.tokens, args.tokens)
    evicting = ctxmem_decode(model, 4 * CAPACITY, args.tokens)  # evicts a chunk every 64 tokens
    recompute = recompute_decode(model, 8)
    ours_ms, plain_ms = 1e3 * statistics.median(ours), 1e3 * statistics.median(plain)
    evicting_ms, recompute_ms = 1e3 * statistics.mean(evicting), 1e3 * statistics.median(recompute)
    rows.append(("decode vs DynamicCache, same length", f"{ours_ms:.2f} ms vs {plain_ms:.2f} ms",
                 f"{ours_ms / plain_ms:.3f}x", "<= 1.05x"))
    rows.append(("decode while evicting (mean, evictions included) vs DynamicCache", f"{evicting_ms:.2f} ms",
                 f"{evicting_ms / plain_ms:.3f}x", "-"))
    rows.append(("recompute at window 1024 vs ctxmem decode", f"{recompute_ms:.1f} ms vs {evicting_ms:.2f} ms",
                 f"{recompute_ms / evicting_ms:.1f}x faster", ">= 22x"))

    short, long = run_child(1_000, args.tokens, args.threads), run_child(args.long, args.tokens, args.threads)
    rows.append((f"decode after {args.long:,} vs 1,000 streamed tokens",
                 f"{1e3 * long['median_s']:.2f} ms vs {1e3 * short['median_s']:.2f} ms",
                 f"{long['median_s'] / short['median_s']:.3f}x", "<= 1.1x"))
    rows.append((f"peak RSS after {args.long:,} vs 1,000 streamed tokens",
                 f"{long['peak_rss_mib']:.0f} MiB vs {short['peak_rss_mib']:.0f} MiB",
                 f"{long['peak_rss_mib'] / short['peak_rss_mib']:.3f}x", "<= 1.1x"))

    table = Table("measurement", "values", "ratio", "target",
                  title=f"streaming cache speed, capacity {CAPACITY}, {args.threads} threads, torch {torch.__version__}")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
