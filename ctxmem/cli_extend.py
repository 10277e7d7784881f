"""`ctxmem extend`: fine-tune a model for a longer context with a RoPE scaling, and write a model folder.

`ctxmem.cli` registers the parser with `add_parser` and calls `run` for the command.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress import TimeRemainingColumn
from rich.table import Table

METHODS = ("pi", "yarn", "ntk", "dynamic-ntk")


def add_parser(commands) -> None:
    """Add the `extend` subcommand to the `commands` subparsers of ctxmem's parser."""
    extend = commands.add_parser(
        "extend", help="extend a model's context: RoPE scaling plus fine-tuning on long text, written to a folder")
    extend.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    extend.add_argument("--model", default="reference", help="'reference', a local folder or a hub id")
    extend.add_argument("--method", required=True, choices=METHODS,
                        help="pi (position interpolation) or yarn, fine-tuned with --steps; ntk or dynamic-ntk, "
                             "training-free (steps 0)")
    extend.add_argument("--factor", type=float, required=True,
                        help="context extension: the new length over the trained length, above 1 (e.g. 4)")
    extend.add_argument("--data", help="UTF-8 text file to fine-tune on (needed with --steps above 0)")
    extend.add_argument("--steps", type=int, default=0,
                        help="optimizer steps (default 0: write the scaled config with unchanged weights)")
    extend.add_argument("--lr", type=float, default=1e-4,
                        help="learning rate of AdamW after a 20-step linear warmup (default 1e-4)")
    extend.add_argument("--context", type=int, default=None,
                        help="tokens per training sequence (default: trained length x factor)")
    extend.add_argument("--batch-size", type=int, default=4, help="training sequences per step")
    extend.add_argument("--seed", type=int, default=0, help="seed of the sampled training spans")
    extend.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N; CUDA trains in bfloat16 autocast with gradient "
                             "checkpointing, the CPU in float32")
    extend.add_argument("--out", required=True, help="model folder to create")
    extend.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    extend.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace, console: Console) -> None:
    """Validate the options, print the memory estimate, fine-tune with a progress bar, and report."""
    from transformers.utils import logging as transformers_logging

    from ctxmem.extend import ExtendSettings, ExtensionJob

    transformers_logging.disable_progress_bar()  # rich draws ctxmem's own progress
    settings = ExtendSettings(method=args.method, factor=args.factor, steps=args.steps, lr=args.lr,
                              context=args.context, batch_size=args.batch_size, seed=args.seed)
    job = ExtensionJob.prepare(args.model, args.out, settings, data=args.data, device=args.device,
                               overwrite=args.overwrite)
    if not args.json:
        console.print(_estimate_line(job), soft_wrap=True)

    with _step_progress(console, settings.steps, f"{settings.method} x{settings.factor:g}", args.json) as on_step:
        result = job.run(on_step=on_step)

    if args.json:
        console.print_json(json.dumps(result.as_dict()))
        return
    table = Table("field", "value", title=f"wrote {result.out}")
    table.add_row("rope_parameters", json.dumps(result.rope_parameters))
    table.add_row("max_position_embeddings", str(result.max_position_embeddings))
    table.add_row("positions in ctxmem's cache", str(result.positions))
    table.add_row("steps", str(settings.steps))
    if settings.steps:
        table.add_row("tokens seen", f"{result.tokens_seen:,} ({settings.batch_size} x {result.context} per step)")
        table.add_row("loss, first and last step", f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    if result.measured_peak_bytes is not None:
        table.add_row("measured CUDA peak", _mib(result.measured_peak_bytes))
    table.add_row("seconds", f"{result.seconds:.1f}")
    console.print(table)


def _estimate_line(job) -> str:
    memory, settings = job.memory, job.settings
    if settings.steps == 0:
        return (f"no fine-tuning (steps 0): writing the {settings.method} x{settings.factor:g} config with the "
                f"unchanged weights of {memory.parameters / 1e6:.1f} M parameters")
    checkpointing = "with" if job.checkpointing else "without"
    return (f"memory estimate: {_mib(memory.total_bytes)} = parameters {_mib(memory.parameter_bytes)} + gradients "
            f"{_mib(memory.gradient_bytes)} + AdamW state {_mib(memory.optimizer_bytes)} + activations "
            f"{_mib(memory.activation_bytes)}, for {memory.parameters / 1e6:.1f} M parameters and "
            f"{settings.batch_size} x {job.context} tokens per step on {job.device}, {checkpointing} gradient "
            "checkpointing")


def _mib(count: int) -> str:
    return f"{count / 2**20:,.0f} MiB"


@contextmanager
def _step_progress(console: Console, steps: int, label: str, quiet: bool):
    """A rich progress bar over fine-tuning steps with the latest loss; yields the on_step callback.

    Silent for --json and for 0 steps.
    """
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("steps, loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, disable=quiet or steps == 0, transient=True) as progress:
        task = progress.add_task(f"fine-tuning {label}", total=steps, loss="-")
        yield lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.3f}")
