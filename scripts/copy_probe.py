"""Probe how fast a small Llama learns to copy: repeated random spans only, ratio logged.

Trains a fresh model on sequences of BOS + a random span (2-64 tokens) repeated to 128 tokens,
the copy phase of scripts/train_reference_model.py, and every 50 steps prints the loss on the
second copy of a random 40-token span over the loss on the first (1.0: no copying). This is how
the reference model's width was chosen; see that script's docstring for the results.

Usage:
    python scripts/copy_probe.py --hidden 128 --heads 4 --kv 2 --ffn 512 --steps 1200
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctxmem.eval import reference_checks as checks
from ctxmem.model import load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def batch(rng: random.Random, plain_ids: range, bos: int, size: int = 32, context: int = 128) -> torch.Tensor:
    rows = []
    for _ in range(size):
        span = [rng.choice(plain_ids) for _ in range(rng.randrange(2, context // 2 + 1))]
        rows.append(([bos] + span * math.ceil(context / len(span)))[:context])
    return torch.tensor(rows)  # [size, context]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    _, tokenizer = load_model("reference", device="cpu")  # the same tokenizer and vocabulary
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv, max_position_embeddings=256, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    plain_ids = range(8, len(tokenizer) - 4)  # past the special tokens, before the tool tags
    started = time.time()

    for step in range(args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        rows = batch(rng, plain_ids, tokenizer.bos_token_id)
        loss = model(rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                ratio = checks.repeat_loss_ratio(model, tokenizer, span=40, count=16, seed=3)
            model.train()
            print(f"step {step:5d}  loss {loss.item():.3f}  repeat ratio {ratio:.3f}  {time.time() - started:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
