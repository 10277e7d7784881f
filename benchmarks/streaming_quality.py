"""Perplexity over whole held-out plays: dense, window, streaming with 0/1/4 sinks, recompute.

Prints one table (overall perplexity per play and method, and the worst 1,024-token bucket of
streaming with 4 sinks against recompute), writes the buckets as JSON and a plot of perplexity
against position. Run: `.venv/bin/python benchmarks/streaming_quality.py` (about 15 minutes on
2 CPU cores for the three plays).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ctxmem import load_model
from ctxmem.config import CacheConfig
from ctxmem.eval.perplexity import PerplexityResult, evaluate
from ctxmem.reference import corpus

HERE = Path(__file__).parent
# (label, method, sinks): the same cache budget for all but dense.
RUNS = [("dense", "dense", 4), ("window", "window", 0), ("streaming, 0 sinks", "streaming", 0),
        ("streaming, 1 sink", "streaming", 1), ("streaming, 4 sinks", "streaming", 4),
        ("recompute, 4 sinks", "recompute", 4)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plays", nargs="+", default=list(corpus.HELD_OUT_PLAYS))
    parser.add_argument("--max-tokens", type=int, default=None, help="cut each play (default: whole plays)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def measure(model, ids: list[int], chunk: int) -> dict[str, PerplexityResult]:
    """Measure every run of RUNS over `ids`, with a budget of the model's full position range."""
    results = {}
    for label, method, sinks in RUNS:
        started = time.perf_counter()
        results[label] = evaluate(model, ids, method, CacheConfig(sinks=sinks, chunk=chunk))
        logging.info("%-20s ppl %8.2f  %.0fs", label, results[label].perplexity, time.perf_counter() - started)
    return results


def worst_ratio(results: dict[str, PerplexityResult]) -> float:
    streaming, oracle = results["streaming, 4 sinks"].buckets, results["recompute, 4 sinks"].buckets
    return max(s.perplexity / o.perplexity for s, o in zip(streaming, oracle))


def plot(all_results: dict[str, dict[str, PerplexityResult]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4.5), squeeze=False)
    for axis, (play, results) in zip(axes[0], all_results.items()):
        for label, result in results.items():
            axis.plot([b.start for b in result.buckets], [b.perplexity for b in result.buckets], label=label)
        axis.set_yscale("log")
        axis.set_title(play)
        axis.set_xlabel("token position in the play")
        axis.set_ylabel("perplexity per 1,024 tokens")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def save(all_results: dict[str, dict[str, PerplexityResult]], out: Path) -> None:
    (out / "streaming_quality.json").write_text(json.dumps(
        {play: {label: r.model_dump() for label, r in results.items()} for play, results in all_results.items()},
        indent=1))
    plot(all_results, out / "streaming_quality.png")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("reference", device="cpu", dtype="float32")
    all_results = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for play in args.plays:
        ids = tokenizer.encode(corpus.load_play(play), add_special_tokens=True)[:args.max_tokens]
        logging.info("%s: %d tokens", play, len(ids))
        all_results[play] = measure(model, ids, args.chunk)
        save(all_results, args.out)  # after every play, so a cut-short run keeps what it measured

    table = Table("play", "tokens", *[label for label, _, _ in RUNS], "worst bucket: streaming 4 / recompute")
    for play, results in all_results.items():
        table.add_row(play, str(next(iter(results.values())).tokens),
                      *[f"{results[label].perplexity:.2f}" for label, _, _ in RUNS], f"{worst_ratio(results):.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
