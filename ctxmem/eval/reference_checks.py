"""Measurements of the reference model inside its 256-token training context.

These are the numbers its model card states and its tests check: held-out perplexity, pass-key
retrieval, tool-call accuracy, copying of a repeated random span, and the attention mass on the
first token (whether attention sinks formed). Each takes a seed, so a rerun gives the same
prompts.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.generation import generate_ids
from ctxmem.reference import synthetic

Model = PreTrainedModel
Tokenizer = PreTrainedTokenizerBase


@torch.no_grad()
def perplexity(model: Model, tokenizer: Tokenizer, text: str, context: int = 256, batch_size: int = 16) -> float:
    """Return the perplexity of `text` in consecutive windows of `context` tokens, each led by BOS.

    Every window predicts its `context - 1` text tokens from BOS and the text before them in
    the same window, as the model was trained.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = context - 1
    windows = [[tokenizer.bos_token_id] + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]
    total_loss, total_tokens = 0.0, 0

    for start in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[start:start + batch_size], device=model.device)  # [batch, context]
        logits = model(batch).logits[:, :-1].float()  # [batch, context - 1, vocab]
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum")
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()

    return float(torch.exp(torch.tensor(total_loss / total_tokens)))


def pass_key_ids(tokenizer: Tokenizer, key: str) -> tuple[list[int], list[int]]:
    """Return the token ids of the statement of `key` and of the question, without BOS."""
    statement = tokenizer.encode(synthetic.PASS_KEY_STATEMENT.format(key=key), add_special_tokens=False)
    question = tokenizer.encode(synthetic.PASS_KEY_QUESTION, add_special_tokens=False)
    return statement, question


def pass_key_prompt(tokenizer: Tokenizer, key: str, filler_ids: list[int]) -> list[int]:
    """Return BOS + statement + filler + question as token ids (the answer follows)."""
    statement, question = pass_key_ids(tokenizer, key)
    return [tokenizer.bos_token_id] + statement + filler_ids + question


def is_pass_key_answer(answer: str, key: str) -> bool:
    """Return whether a decoded answer repeats `key` first, as the model was trained to answer."""
    return answer.strip().startswith(key)


def pass_key_accuracy(
    model: Model, tokenizer: Tokenizer, filler_text: str, count: int = 50, context: int = 256, seed: int = 7
) -> float:
    """Return the share of `count` prompts whose greedy answer repeats the pass key.

    The filler is a random span of `filler_text`, of random length, so the distance between
    fact and question varies across the whole context.
    """
    rng = random.Random(seed)
    filler_ids = tokenizer.encode(filler_text, add_special_tokens=False)
    correct = 0

    for _ in range(count):
        key = synthetic.pass_key(rng)
        room = context - len(pass_key_prompt(tokenizer, key, [])) - 8  # 8 tokens for the reply
        length = rng.randrange(0, room + 1)
        start = rng.randrange(len(filler_ids) - length)
        prompt = pass_key_prompt(tokenizer, key, filler_ids[start:start + length])
        answer = tokenizer.decode(generate_ids(model, prompt, max_new_tokens=7))
        correct += is_pass_key_answer(answer, key)

    return correct / count


def tool_call_accuracy(model: Model, tokenizer: Tokenizer, count: int = 50, seed: int = 1_000_003) -> float:
    """Return the share of held-out tool requests whose reply is a JSON call to the right tool.

    The prompts come from a seed that training never uses; the greedy reply must contain
    `<tool_call>{...}</tool_call>` that parses as JSON and names the expected tool.
    """
    rng = random.Random(seed)
    correct = 0

    for _ in range(count):
        messages, tools, task = synthetic.tool_prompt(rng)
        prompt = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        reply = tokenizer.decode(generate_ids(model, prompt, 48, stop_id=tokenizer.eos_token_id))
        call = synthetic.parse_tool_call(reply)
        correct += call is not None and call.get("name") == task.tool

    return correct / count


@torch.no_grad()
def repeat_loss_ratio(model: Model, tokenizer: Tokenizer, span: int = 40, count: int = 32, seed: int = 11) -> float:
    """Return mean loss on the second copy of a random `span`-token sequence over the first copy.

    A model that copies from context predicts the second copy almost perfectly, so the ratio
    falls far below 1; without copying both copies are equally unpredictable (ratio near 1).
    """
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"]))
    plain = [i for i in range(len(tokenizer)) if i not in special]
    rows = []
    for _ in range(count):
        seq = [rng.choice(plain) for _ in range(span)]
        rows.append([tokenizer.bos_token_id] + seq + seq)

    batch = torch.tensor(rows, device=model.device)  # [count, 1 + 2 * span]
    logits = model(batch).logits[:, :-1].float()
    losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [count, 2 * span]
    first = losses[:, 1:span].mean()  # the first token of each copy has no context to copy from
    second = losses[:, span + 1:].mean()
    return (second / first).item()


@torch.no_grad()
def first_token_attention(model: Model, tokenizer: Tokenizer, text: str, context: int = 256, windows: int = 4) -> list[float]:
    """Return, per layer, the mean attention probability that queries put on the first token.

    Averaged over heads and over queries at positions 16 and later, so that the share is not
    inflated by early queries that have few tokens to attend to. Values far above 1/position
    mean the layer uses the first token as an attention sink.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = context - 1
    batch = torch.tensor(
        [[tokenizer.bos_token_id] + ids[i * step:(i + 1) * step] for i in range(windows)], device=model.device
    )  # [windows, context]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(batch, output_attentions=True).attentions  # layers x [windows, heads, q, k]
    finally:
        model.set_attn_implementation(previous)
    return [layer[:, :, 16:, 0].float().mean().item() for layer in attentions]
