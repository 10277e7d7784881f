"""The `ctxmem` command line: model information, generation and the demo.

Every command takes `--json` for machine-readable output. Invalid input prints a one-line
error naming the value and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from rich.console import Console
from rich.table import Table

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

    demo = commands.add_parser("demo", help="run the main job on the reference model")
    _add_model_options(demo)
    demo.add_argument("--redis-url", help="Redis URL (default: $CTXMEM_REDIS_URL, else the embedded server)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    parser.add_argument("--model", default="reference", help="'reference', a local folder or a hub id")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def run_info(args: argparse.Namespace, console: Console) -> None:
    from ctxmem.model import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
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
    from ctxmem.model import load_model

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
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


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], None]] = {
    "info": run_info,
    "generate": run_generate,
    "demo": run_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        COMMANDS[args.command](args, console)
    except USAGE_ERRORS as error:
        message = " ".join(str(error).split())
        Console(stderr=True, soft_wrap=True).print(f"error: {message}", markup=False, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
