"""Train ctxmem's reference model from scratch: a small Llama (RoPE, GQA) on Shakespeare.

The model exists so that every long-context claim of ctxmem can be measured offline, on a real
model with real attention sinks and real in-context copying. Everything is reproducible from
`--seed`. The training mix (see `ctxmem.reference.synthetic`):

    plays          text of the training plays (three plays are held out, see corpus.py)
    pass_key       a five-digit key stated early, filler, then the question and the answer
    chat           chats in the reference chat template, most calling a toy tool
    repeat_random  a random token span repeated until the sequence is full
    repeat_text    a span of play text repeated once

Copying from context does not appear by itself at this size. Training therefore starts with a
copy phase of repeated random spans alone (128-token sequences, batch 32) until the loss on a
span's second copy falls below 0.3 of the loss on its first copy, or for at most
--max-copy-steps steps; the main mix follows, with copy data still in it. The ratio is logged
every --log-every steps.

The default model is narrow (hidden size 128, head_dim 32) with a wide MLP (5888) to reach
5 M parameters. In copy-only probes on 2 CPU cores (2 layers, batch 32 x 128 tokens, lr 1e-3),
hidden size 128 learned to copy abruptly after about 750 steps, with or without GQA and weight
decay, while hidden sizes 256 and 384 (head_dim 64) only drifted to ratios of 0.7-0.85 by
850-1150 steps. Earlier trials with 4 and 6 layers at hidden size 384 did not copy either.

Usage:
    python scripts/train_reference_model.py --out ctxmem/reference/model --steps 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ctxmem.eval import reference_checks as checks
from ctxmem.reference import corpus, synthetic
from ctxmem.reference.chat_template import CHAT_TEMPLATE

logger = logging.getLogger("train_reference_model")

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>"]
# Phase one teaches copying alone; phase two is the main mix. The switch happens once the
# repeated-span loss ratio falls below COPY_LEARNED_RATIO, or after --max-copy-steps.
COPY_MIX = {"repeat_random": 1.0}
COPY_CONTEXT, COPY_BATCH = 128, 32  # the copy phase: twice the sequences, half as long
MIX = {"plays": 0.40, "chat": 0.20, "pass_key": 0.20, "repeat_random": 0.10, "repeat_text": 0.10}
COPY_LEARNED_RATIO = 0.3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=3400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=256, help="training sequence length")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine to 10%%)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=3072)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=5888)
    parser.add_argument("--max-copy-steps", type=int, default=1500, help="maximum length of the copy-only phase, in steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=500)
    return parser.parse_args(argv)


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (digits split one per token) and wrap it for transformers.

    Single digits make a pass key five tokens that the model copies one by one.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TAGS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TOOL_TAGS])

    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        model_max_length=1_000_000_000,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class MixSampler:
    """Draws training sequences that start with BOS: `context` tokens long, COPY_CONTEXT in the copy phase."""

    def __init__(self, tokenizer, play_ids: list[int], context: int, rng: random.Random, steps: int):
        self.tokenizer = tokenizer
        self.play_ids = play_ids
        self.context = context
        self.rng = rng
        self.steps = steps
        self.bos = tokenizer.bos_token_id
        self.mix = COPY_MIX
        self.main_mix_from: int | None = None
        self.first_plain_id = len(SPECIAL_TOKENS)
        self.plain_vocab_end = len(tokenizer) - len(TOOL_TAGS)

    def play_span(self, length: int) -> list[int]:
        start = self.rng.randrange(len(self.play_ids) - length)
        return self.play_ids[start:start + length]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def fill(self, ids: list[int]) -> list[int]:
        """Pad a sequence with play text up to the context length, or cut it there."""
        missing = self.context - len(ids)
        return ids + self.play_span(missing) if missing > 0 else ids[:self.context]

    def plays(self, step: int) -> list[int]:
        return [self.bos] + self.play_span(self.context - 1)

    def pass_key(self, step: int) -> list[int]:
        # Filler stays short while copying is learned, then grows to the whole context over
        # the first 30% of the main phase.
        key = synthetic.pass_key(self.rng)
        statement = self.encode(synthetic.PASS_KEY_STATEMENT.format(key=key))
        question = self.encode(synthetic.PASS_KEY_QUESTION)
        answer = self.encode(f" {key}.")
        room = self.context - 1 - len(statement) - len(question) - len(answer)
        main_steps = 0 if self.main_mix_from is None else step - self.main_mix_from
        ramp = min(1.0, main_steps / max(1, 0.3 * self.steps))
        filler_len = self.rng.randrange(0, int(30 + ramp * (room - 30)) + 1)
        prefix_len = self.rng.randrange(0, room - filler_len + 1) if self.rng.random() < 0.5 else 0
        ids = [self.bos] + self.play_span(prefix_len) + statement + self.play_span(filler_len)
        return self.fill(ids + question + answer)

    def chat(self, step: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < self.context:
            messages, tools = synthetic.random_chat(self.rng)
            ids += self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True,
                                                      return_dict=False)
        return ids[:self.context]

    def repeat_random(self, step: int) -> list[int]:
        context = self.context if self.main_mix_from is not None else COPY_CONTEXT
        span = [self.rng.randrange(self.first_plain_id, self.plain_vocab_end)
                for _ in range(self.rng.randrange(2, context // 2 + 1))]
        repeats = math.ceil((context - 1) / len(span))
        return ([self.bos] + span * repeats)[:context]

    def repeat_text(self, step: int) -> list[int]:
        span = self.play_span(self.rng.randrange(20, (self.context - 1) // 2))
        return self.fill([self.bos] + span + span)

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        kinds = self.rng.choices(list(self.mix), weights=list(self.mix.values()), k=size)
        rows = [getattr(self, kind)(step) for kind in kinds]
        return torch.tensor(rows, dtype=torch.long), kinds  # [batch, context]


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_model(args: argparse.Namespace, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    started = time.time()

    play_texts = [corpus.load_play(name) for name in corpus.training_play_names()]
    chat_rng = random.Random(args.seed + 1)
    chat_texts = [str(synthetic.random_chat(chat_rng)) for _ in range(2000)]
    tokenizer = build_tokenizer(play_texts + chat_texts, args.vocab_size)
    play_ids = tokenizer.encode("\n".join(play_texts), add_special_tokens=False)
    logger.info("tokenizer: %d tokens; training plays: %d tokens", len(tokenizer), len(play_ids))

    model = make_model(args, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2f M parameters", parameters / 1e6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sampler = MixSampler(tokenizer, play_ids, args.context, rng, args.steps)
    history = []
    args.out.mkdir(parents=True, exist_ok=True)

    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        batch, kinds = sampler.batch(step, args.batch_size if sampler.main_mix_from is not None else COPY_BATCH)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        if step % args.log_every == 0 or step == args.steps - 1:
            model.eval()
            ratio = checks.repeat_loss_ratio(model, tokenizer, span=40, count=16, seed=args.seed + 2)
            model.train()
            elapsed = time.time() - started
            history.append({"step": step, "loss": round(loss.item(), 4), "repeat_loss_ratio": round(ratio, 4),
                            "elapsed_s": round(elapsed, 1)})
            logger.info("step %5d  loss %.3f  repeat ratio %.3f  %.0fs", step, loss.item(), ratio, elapsed)
            if sampler.main_mix_from is None and (ratio < COPY_LEARNED_RATIO or step >= args.max_copy_steps):
                sampler.mix, sampler.main_mix_from = MIX, step
                logger.info("step %5d  copy phase done (repeat ratio %.3f); main mix from here", step, ratio)
        if (step + 1) % args.save_every == 0:
            save(model, tokenizer, args, parameters, history, started, step + 1, sampler.main_mix_from)

    save(model, tokenizer, args, parameters, history, started, args.steps, sampler.main_mix_from)


def save(model, tokenizer, args, parameters: int, history: list[dict], started: float, steps_done: int,
         main_mix_from: int | None) -> None:
    """Write weights, tokenizer and the training record (read by the model-card script)."""
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {
        "command": "python " + " ".join(sys.argv),
        "seed": args.seed,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "steps": steps_done,
        "batch_size": args.batch_size,
        "context": args.context,
        "tokens_seen": steps_done * args.batch_size * args.context,
        "parameters": parameters,
        "copy_mix": COPY_MIX,
        "copy_phase_steps": main_mix_from,
        "mix": MIX,
        "held_out_plays": list(corpus.HELD_OUT_PLAYS),
        "training_seconds": round(time.time() - started, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "history": history,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("saved %s after %d steps", args.out, steps_done)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(parse_args(sys.argv[1:]))
