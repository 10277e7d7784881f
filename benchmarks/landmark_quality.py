"""Landmarks at an equal KV budget: perplexity on held-out plays, and pass-key accuracy by distance.

Every configuration holds the same number of cache entries (the reference model's 256
positions): sinks + landmark slots + retrieval region + window. Perplexity compares sinks +
landmarks + window against sinks + window (the target is 0.97x or lower) and publishes the
ablations: mean vs centroids, recomputed vs window KV, with and without the log-count bias,
recent vs relevant vs retrieve. The pass-key part runs `ctxmem.eval.passkey` per method and
distance. Run: `.venv/bin/python benchmarks/landmark_quality.py` (about 30 minutes on 2 CPU
cores with the defaults); it writes results/landmark_quality.json and a plot.
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
from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.eval import passkey
from ctxmem.eval.perplexity import evaluate
from ctxmem.reference import corpus

HERE = Path(__file__).parent
CHUNK = 32
SINKS = 4

# label: (chunk, landmark slots, retrieval slots, landmark settings or None for plain streaming)
CONFIGS: dict[str, tuple[int, int, int, LandmarkConfig | None]] = {
    "sinks + window": (CHUNK, 0, 0, None),
    "recent 8, mean": (CHUNK, 8, 0, LandmarkConfig()),
    "recent 8, mean, bias": (CHUNK, 8, 0, LandmarkConfig(bias=True)),
    "recent 8, mean, window KV": (CHUNK, 8, 0, LandmarkConfig(source="window")),
    "recent 4 x 2 centroids": (CHUNK, 8, 0, LandmarkConfig(centroids=2)),
    "recent 32, mean": (CHUNK, 32, 0, LandmarkConfig()),
    "relevant 8": (CHUNK, 8, 0, LandmarkConfig(policy="relevant")),
    "relevant 8, bias": (CHUNK, 8, 0, LandmarkConfig(policy="relevant", bias=True)),
    "retrieve 3 x 32": (CHUNK, 0, 96, LandmarkConfig(policy="retrieve", retrieve=3, source="window")),
    "retrieve 6 x 16": (16, 0, 96, LandmarkConfig(policy="retrieve", retrieve=6, source="window")),
}
PASS_KEY_CONFIGS = ["sinks + window", "recent 8, mean", "relevant 8", "retrieve 3 x 32", "retrieve 6 x 16"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plays", nargs="+", default=["the-tempest", "twelfth-night"])
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens of each play scored")
    parser.add_argument("--distances", default="512,2048,8192,16384")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--skip", choices=["ppl", "passkey"], help="leave one part out")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def cache_config(label: str) -> CacheConfig:
    chunk, slots, retrieval, _ = CONFIGS[label]
    return CacheConfig(sinks=SINKS, chunk=chunk, landmark_slots=slots, retrieval_slots=retrieval)


def perplexities(model, tokenizer, plays: list[str], max_tokens: int) -> dict[str, dict[str, float]]:
    """Return {play: {label: perplexity}} for every configuration."""
    results: dict[str, dict[str, float]] = {}
    for play in plays:
        ids = tokenizer.encode(corpus.load_play(play), add_special_tokens=True)[:max_tokens]
        results[play] = {}
        for label, (_, _, _, landmarks) in CONFIGS.items():
            started = time.perf_counter()
            method = "streaming" if landmarks is None else "landmarks"
            result = evaluate(model, ids, method, cache_config(label), landmarks=landmarks)
            results[play][label] = result.perplexity
            logging.info("%s %-28s ppl %7.2f  %.0fs", play, label, result.perplexity, time.perf_counter() - started)
    return results


def pass_keys(model, tokenizer, distances: list[int], trials: int) -> dict[str, dict[int, float]]:
    """Return {label: {distance: accuracy}} for the PASS_KEY_CONFIGS, on Hamlet as filler."""
    filler = tokenizer.encode(corpus.load_play("hamlet"), add_special_tokens=False)
    results: dict[str, dict[int, float]] = {}
    for label in PASS_KEY_CONFIGS:
        landmarks = CONFIGS[label][3]
        method = "streaming" if landmarks is None else "landmarks"
        started = time.perf_counter()
        result = passkey.evaluate(model, tokenizer, filler, method, cache_config(label), landmarks=landmarks,
                                  distances=distances, trials=trials, seed=0)
        results[label] = {entry.distance: entry.accuracy for entry in result.distances}
        logging.info("pass key %-24s %s  %.0fs", label, results[label], time.perf_counter() - started)
    return results


def plot(keys: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, by_distance in keys.items():
        axis.plot(list(by_distance), list(by_distance.values()), marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("tokens between the pass key and the question")
    axis.set_ylabel("accuracy")
    axis.set_ylim(-0.05, 1.05)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def report(ppl: dict[str, dict[str, float]], keys: dict[str, dict[int, float]]) -> None:
    console = Console()
    if ppl:
        table = Table("configuration", *[f"{play}" for play in ppl], "ratio to sinks + window (mean)",
                      title="perplexity at an equal budget of 256 entries")
        for label in CONFIGS:
            ratios = [ppl[play][label] / ppl[play]["sinks + window"] for play in ppl]
            table.add_row(label, *[f"{ppl[play][label]:.2f}" for play in ppl], f"{sum(ratios) / len(ratios):.4f}")
        console.print(table)
    if keys:
        distances = list(next(iter(keys.values())))
        table = Table("configuration", *[str(d) for d in distances], title="pass-key accuracy by distance")
        for label, by_distance in keys.items():
            table.add_row(label, *[f"{by_distance[d]:.2f}" for d in distances])
        console.print(table)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("reference", device="cpu", dtype="float32")
    args.out.mkdir(parents=True, exist_ok=True)
    ppl = {} if args.skip == "ppl" else perplexities(model, tokenizer, args.plays, args.max_tokens)
    distances = [int(d) for d in args.distances.split(",")]
    keys = {} if args.skip == "passkey" else pass_keys(model, tokenizer, distances, args.trials)
    (args.out / "landmark_quality.json").write_text(json.dumps(
        {"chunk": CHUNK, "sinks": SINKS, "max_tokens": args.max_tokens, "perplexity": ppl,
         "pass_key": {label: {str(d): a for d, a in row.items()} for label, row in keys.items()}}, indent=1))
    if keys:
        plot(keys, args.out / "landmark_quality.png")
    report(ppl, keys)


if __name__ == "__main__":
    main()
