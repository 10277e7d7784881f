"""Context extension on the reference model: RoPE scalings with and without fine-tuning, by length.

Perplexity on the held-out plays at 1x, 2x, 4x, 8x and 16x the trained 256 tokens, each
length scored on sequences of that length in one forward pass (ctxmem.eval.length):

1. without fine-tuning, one model per method scaled by factor 4, at every length: no scaling,
   PI, NTK-aware, dynamic NTK and YaRN. Dynamic NTK is also decoded in pieces of 64 through a
   KV cache, as generation runs it. A column gives the perplexity of the first 256 positions,
   where no scaling is needed;
2. without fine-tuning, PI, NTK-aware and YaRN with the factor matched to each length;
3. PI and YaRN at factor 4, fine-tuned on 1,024-token spans of the training plays, measured at
   4x (and 1x) after each step count of --steps. A control run fine-tunes the unscaled model on
   256-token spans, which separates adaptation to Shakespeare from adaptation to the new
   positions;
4. the fine-tuning tokens each method needs to reach 1.05x the in-window perplexity (no
   scaling at 1x) at 4x, interpolated linearly between measured step counts; the same for 1.0x
   and 0.95x, and for the perplexity PI reaches at its last step count.

Writes results/extension.json, results/extension_positions.png (perplexity against position)
and results/extension_finetuning.png (perplexity at 4x against fine-tuning tokens). Run:
`.venv/bin/python benchmarks/extension.py` (56 minutes on 1 thread of the 2-core development
machine, shared with other jobs, with the defaults).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from ctxmem import RopeScaling, load_model
from ctxmem.eval.length import bucket_perplexity, perplexity, position_nll, sequences
from ctxmem.extend import ExtendSettings, finetune
from ctxmem.reference import corpus

HERE = Path(__file__).parent
TRAINED = 256
MULTIPLES = (1, 2, 4, 8, 16)
FACTOR = 4  # the factor of part 1 and of fine-tuning
SCALED = ("pi", "ntk", "dynamic-ntk", "yarn")
TARGET_RATIO = 1.05
# Further ratios of the in-window perplexity at which the fine-tuning tokens are reported, for when
# a method starts below TARGET_RATIO before any fine-tuning.
EXTRA_RATIOS = (1.0, 0.95)
BUCKET = 256  # positions per point of the position plot
CACHED_PIECE = 64

logger = logging.getLogger("extension")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="0,5,10,25,50,100,200,400",
                        help="comma-separated step counts at which the fine-tuned models are measured")
    parser.add_argument("--batch-size", type=int, default=2, help="1,024-token sequences per fine-tuning step")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate after the warmup")
    parser.add_argument("--eval-tokens", type=int, default=32_768,
                        help="held-out tokens scored per method and length")
    parser.add_argument("--no-control", action="store_true", help="skip the unscaled fine-tuning control run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


class Evaluator:
    """Scores models on the same held-out sequences per length, and keeps the results."""

    def __init__(self, held_out: list[int], bos_id: int, eval_tokens: int):
        self.rows = {multiple: sequences(held_out, TRAINED * multiple, max(1, eval_tokens // (TRAINED * multiple)),
                                         bos_id) for multiple in MULTIPLES}

    def measure(self, model, multiple: int, piece: int | None = None) -> dict:
        started = time.perf_counter()
        nll = position_nll(model, self.rows[multiple], piece=piece)  # [rows, length - 1]
        result = {"ppl": perplexity(nll), "first_256_ppl": perplexity(nll[:, :TRAINED - 1]),
                  "buckets": bucket_perplexity(nll, BUCKET), "rows": nll.shape[0]}
        logger.info("  %2dx: ppl %9.2f, first 256 positions %8.2f (%.0f s)", multiple, result["ppl"],
                    result["first_256_ppl"], time.perf_counter() - started)
        return result


def scaled_model(method: str, factor: float):
    rope = None if method == "none" else RopeScaling(method=method, factor=factor)
    model, _ = load_model("reference", device="cpu", dtype="float32", rope=rope)
    return model


def fixed_factor(evaluator: Evaluator) -> dict[str, dict[int, dict]]:
    """Part 1: no scaling, and each method at factor 4, at every length without fine-tuning."""
    results: dict[str, dict[int, dict]] = {}
    for method in ("none", *SCALED):
        logger.info("%s%s, no fine-tuning", method, "" if method == "none" else f" x{FACTOR}")
        model = scaled_model(method, FACTOR)
        results[method] = {multiple: evaluator.measure(model, multiple) for multiple in MULTIPLES}
    logger.info("dynamic-ntk x%d, cached decode in pieces of %d", FACTOR, CACHED_PIECE)
    model = scaled_model("dynamic-ntk", FACTOR)
    results["dynamic-ntk, cached"] = {multiple: evaluator.measure(model, multiple, piece=CACHED_PIECE)
                                      for multiple in MULTIPLES}
    return results


def matched_factor(evaluator: Evaluator) -> dict[str, dict[int, dict]]:
    """Part 2: PI, NTK-aware and YaRN with the factor equal to the length multiple."""
    results: dict[str, dict[int, dict]] = {}
    for method in ("pi", "ntk", "yarn"):
        results[method] = {}
        for multiple in MULTIPLES[1:]:
            logger.info("%s x%d, no fine-tuning", method, multiple)
            results[method][multiple] = evaluator.measure(scaled_model(method, multiple), multiple)
    return results


def fine_tuning(evaluator: Evaluator, method: str, train_ids: list[int], bos_id: int, args,
                checkpoints: list[int]) -> dict:
    """Part 3: fine-tune one model and measure it at each checkpoint; at the end, at every length.

    The learning rate is constant after the warmup, so the model after N steps of one long run
    is the model a run of N steps would write.
    """
    context = TRAINED * (1 if method == "none" else FACTOR)
    batch_size = args.batch_size * (FACTOR if method == "none" else 1)  # the same tokens per step
    model = scaled_model(method, FACTOR)
    # finetune reads only the training fields of the settings, so the control run passes "pi" to validate them.
    settings = ExtendSettings(method="pi" if method == "none" else method, factor=FACTOR, steps=max(checkpoints),
                              lr=args.lr, context=context, batch_size=batch_size)
    measured_at = 4 if method != "none" else 1
    curve = []
    started = time.perf_counter()

    def measure(step: int, loss: float | None) -> None:
        if step not in checkpoints:
            return
        logger.info("%s fine-tuned %d steps (loss %s, %.0f s of training and measuring)", method, step,
                    "-" if loss is None else f"{loss:.3f}", time.perf_counter() - started)
        point = {"step": step, "tokens": step * batch_size * context, "loss": loss,
                 f"ppl_{measured_at}x": evaluator.measure(model, measured_at)["ppl"]}
        if method != "none":
            point["ppl_1x"] = evaluator.measure(model, 1)["ppl"]
        curve.append(point)

    measure(0, None)
    finetune(model, train_ids, settings, context, bos_id, on_step=measure)
    final = {}
    if method != "none":
        logger.info("%s fine-tuned %d steps, at every length", method, max(checkpoints))
        final = {multiple: evaluator.measure(model, multiple) for multiple in MULTIPLES}
    return {"context": context, "batch_size": batch_size, "curve": curve, "final": final}


def tokens_to_target(curve: list[dict], target: float) -> float | None:
    """Return the fine-tuning tokens at which ppl at 4x first falls to `target`, interpolated linearly.

    None when no measured point reaches it.
    """
    previous = None
    for point in curve:
        if point["ppl_4x"] <= target:
            if previous is None:
                return float(point["tokens"])
            fraction = (previous["ppl_4x"] - target) / (previous["ppl_4x"] - point["ppl_4x"])
            return previous["tokens"] + fraction * (point["tokens"] - previous["tokens"])
        previous = point
    return None


def fixed_label(label: str) -> str:
    """Return "pi x4" for "pi", "dynamic-ntk x4, cached" for "dynamic-ntk, cached", and "none" as is."""
    if label == "none":
        return label
    method, comma, rest = label.partition(",")
    return f"{method} x{FACTOR}{comma}{rest}"


def plot_positions(fixed: dict, tuned: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    longest = MULTIPLES[-1]
    for label, results in fixed.items():
        buckets = results[longest]["buckets"]
        axes[0].plot([start for start, _ in buckets], [value for _, value in buckets], label=fixed_label(label))
    baseline = fixed["none"][longest]["buckets"]
    axes[1].plot([start for start, _ in baseline], [value for _, value in baseline], label="none", color="gray")
    for method, run in tuned.items():
        if run["final"]:
            buckets = run["final"][longest]["buckets"]
            steps = run["curve"][-1]["step"]
            axes[1].plot([start for start, _ in buckets], [value for _, value in buckets],
                         label=f"{method} x{FACTOR}, fine-tuned {steps} steps")
    titles = ("without fine-tuning", f"after fine-tuning at {FACTOR}x ({TRAINED * FACTOR}-token sequences)")
    for axis, title in zip(axes, titles):
        axis.set_yscale("log")
        axis.set_title(f"{title}: {TRAINED * longest}-token sequences", fontsize=10)
        axis.set_xlabel("position in the sequence")
        for boundary in (TRAINED, TRAINED * FACTOR):
            axis.axvline(boundary, color="black", linewidth=0.6, linestyle=":")
        axis.legend(fontsize=8)
    axes[0].set_ylabel(f"held-out perplexity per {BUCKET} positions")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_finetuning(tuned: dict, in_window: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, run in tuned.items():
        if method == "none":
            continue
        axis.plot([p["tokens"] for p in run["curve"]], [p["ppl_4x"] for p in run["curve"]], marker="o",
                  label=f"{method} x{FACTOR}, at 4x")
    axis.axhline(in_window, color="gray", linewidth=0.8, label="no scaling, 1x (in-window)")
    axis.axhline(TARGET_RATIO * in_window, color="gray", linestyle="--", linewidth=0.8,
                 label=f"target: {TARGET_RATIO}x in-window")
    if "none" in tuned:
        control = tuned["none"]["curve"]
        axis.plot([p["tokens"] for p in control], [p["ppl_1x"] for p in control], marker=".", color="gray",
                  linestyle=":", label="control: no scaling fine-tuned at 1x, at 1x")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    first = min(p["tokens"] for run in tuned.values() for p in run["curve"] if p["tokens"] > 0)
    axis.set_xscale("symlog", linthresh=first)  # linear from 0 to the first checkpoint, logarithmic after
    axis.set_xlabel("fine-tuning tokens")
    axis.set_ylabel("held-out perplexity")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_tables(result: dict) -> None:
    console = Console()
    fixed, matched, tuned = result["fixed_factor"], result["matched_factor"], result["fine_tuning"]
    columns = [f"{m}x ({TRAINED * m})" for m in MULTIPLES]
    table = Table("method", *columns, "first 256 positions at 4x",
                  title=f"held-out perplexity by sequence length, factor {FACTOR}, no fine-tuning")
    for label, runs in fixed.items():
        table.add_row(fixed_label(label), *[f"{runs[m]['ppl']:.2f}" for m in MULTIPLES], f"{runs[4]['first_256_ppl']:.2f}")
    for method, run in tuned.items():
        if run["final"]:
            name = f"{method} x{FACTOR}, fine-tuned {run['curve'][-1]['step']} steps"
            table.add_row(name, *[f"{run['final'][m]['ppl']:.2f}" for m in MULTIPLES],
                          f"{run['final'][4]['first_256_ppl']:.2f}")
    console.print(table)

    table = Table("method", *columns[1:], title="factor matched to the length, no fine-tuning")
    for method, runs in matched.items():
        table.add_row(method, *[f"{runs[m]['ppl']:.2f}" for m in MULTIPLES[1:]])
    console.print(table)

    table = Table("method", "step", "tokens", "ppl at 4x", "ppl at 1x", "loss",
                  title=f"fine-tuning at {FACTOR}x (target at 4x: {result['target']:.2f} = {TARGET_RATIO} x "
                        f"in-window {result['in_window']:.2f})")
    for method, run in tuned.items():
        for point in run["curve"]:
            table.add_row(method if method != "none" else "control (no scaling, 1x)", str(point["step"]),
                          f"{point['tokens']:,}", f"{point['ppl_4x']:.2f}" if "ppl_4x" in point else "-",
                          f"{point['ppl_1x']:.2f}", "-" if point["loss"] is None else f"{point['loss']:.3f}")
    console.print(table)

    ratios = (TARGET_RATIO, *EXTRA_RATIOS)
    table = Table("method", *[f"{ratio}x in-window ({ratio * result['in_window']:.2f})" for ratio in ratios],
                  title="fine-tuning tokens until the perplexity at 4x reaches")
    for method, reached in result["tokens_to_ratio"].items():
        limit = max(p["tokens"] for p in tuned[method]["curve"])
        table.add_row(method, *[f"{reached[str(ratio)]:,.0f}" if reached[str(ratio)] is not None
                                else f"not within {limit:,}" for ratio in ratios])
    console.print(table)
    reached = result["tokens_to_pi_final"]
    yarn = "not reached" if reached["yarn"] is None else f"{reached['yarn']:,.0f} tokens"
    console.print(f"PI's perplexity at 4x after its last step count, {reached['ppl']:.2f}: PI reached it after "
                  f"{reached['pi']:,.0f} tokens, YaRN after {yarn}")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoints = sorted({int(step) for step in args.steps.split(",")} | {0})
    started = time.perf_counter()

    _, tokenizer = load_model("reference", device="cpu")
    held_out = tokenizer.encode(corpus.held_out_text(), add_special_tokens=False)
    train_text = "\n".join(corpus.load_play(name) for name in corpus.training_play_names())
    train_ids = tokenizer.encode(train_text, add_special_tokens=False)
    evaluator = Evaluator(held_out, tokenizer.bos_token_id, args.eval_tokens)
    logger.info("held-out: %d tokens; training plays: %d tokens", len(held_out), len(train_ids))

    result: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
        "settings": {"steps": checkpoints, "batch_size": args.batch_size, "lr": args.lr,
                     "eval_tokens": args.eval_tokens, "factor": FACTOR, "warmup_steps": 20},
    }
    result["fixed_factor"] = fixed_factor(evaluator)
    result["in_window"] = result["fixed_factor"]["none"][1]["ppl"]
    result["target"] = TARGET_RATIO * result["in_window"]
    result["matched_factor"] = matched_factor(evaluator)
    methods = ("pi", "yarn") if args.no_control else ("pi", "yarn", "none")
    result["fine_tuning"] = {}
    for method in methods:
        result["fine_tuning"][method] = fine_tuning(evaluator, method, train_ids, tokenizer.bos_token_id, args,
                                                    checkpoints)
        (args.out / "extension.json").write_text(json.dumps(result, indent=1))  # keep what is measured so far
    result["tokens_to_target"] = {method: tokens_to_target(result["fine_tuning"][method]["curve"], result["target"])
                                  for method in ("pi", "yarn")}
    result["tokens_to_ratio"] = {
        method: {str(ratio): tokens_to_target(result["fine_tuning"][method]["curve"], ratio * result["in_window"])
                 for ratio in (TARGET_RATIO, *EXTRA_RATIOS)}
        for method in ("pi", "yarn")}
    pi_final = result["fine_tuning"]["pi"]["curve"][-1]["ppl_4x"]
    result["tokens_to_pi_final"] = {"ppl": pi_final, **{
        method: tokens_to_target(result["fine_tuning"][method]["curve"], pi_final) for method in ("pi", "yarn")}}
    result["seconds"] = round(time.perf_counter() - started)

    (args.out / "extension.json").write_text(json.dumps(result, indent=1))
    plot_positions(result["fixed_factor"], result["fine_tuning"], args.out / "extension_positions.png")
    plot_finetuning(result["fine_tuning"], result["in_window"], args.out / "extension_finetuning.png")
    print_tables(result)
    logger.info("done in %.0f s", result["seconds"])


if __name__ == "__main__":
    main()
