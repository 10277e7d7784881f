"""Perplexity by sequence length and by position: how well a model reads text of a given length.

A model is scored on whole sequences of `length` tokens, each led by BOS and taken at evenly
spaced offsets of a long text, in one forward pass per sequence (no cache). That is how
context-extension papers report perplexity at 2x, 4x or 16x the trained length. The loss at
each position shows where a model breaks down: past its trained length, or, for a scaling
that hurts short context, already near the start.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel


def sequences(ids: list[int], length: int, count: int, bos_id: int | None) -> torch.Tensor:
    """Return `count` sequences [count, length] cut from `ids` at evenly spaced offsets, each led by BOS.

    Raises ValueError when `ids` is shorter than one sequence.
    """
    span = length - (1 if bos_id is not None else 0)
    if len(ids) < span:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one sequence of {length} needs ({span}); "
                         "pass a longer text or a shorter length")
    last = len(ids) - span
    offsets = [round(index * last / max(1, count - 1)) for index in range(count)]
    rows = torch.tensor([ids[offset:offset + span] for offset in offsets], dtype=torch.long)  # [count, span]
    if bos_id is None:
        return rows
    return torch.cat((torch.full((count, 1), bos_id, dtype=torch.long), rows), dim=1)  # [count, length]


@torch.no_grad()
def position_nll(model: PreTrainedModel, rows: torch.Tensor, batch_tokens: int = 8192,
                 piece: int | None = None) -> torch.Tensor:
    """Return the loss of every token after the first of each row: [rows, length - 1].

    Rows go through the model in batches of about `batch_tokens` tokens, each row in one
    forward pass. With `piece`, each row is instead fed `piece` tokens at a time into a
    DynamicCache, as generation feeds a prompt and then its reply. A RoPE scaling that depends
    on the current length (dynamic NTK) then runs at every intermediate length.
    """
    model.eval()
    rows = rows.to(model.device)
    if piece is not None:
        return torch.stack([_cached_row_nll(model, row, piece) for row in rows])
    per_batch = max(1, batch_tokens // rows.shape[1])
    losses = []
    for start in range(0, rows.shape[0], per_batch):
        batch = rows[start:start + per_batch]  # [batch, length]
        logits = model(input_ids=batch).logits[:, :-1].float()  # [batch, length - 1, vocab]
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [batch, length - 1]
        losses.append(nll.cpu())
    return torch.cat(losses)


def _cached_row_nll(model: PreTrainedModel, row: torch.Tensor, piece: int) -> torch.Tensor:
    cache, losses, previous = DynamicCache(config=model.config), [], None
    for start in range(0, row.numel(), piece):
        ids = row[start:start + piece][None]  # [1, piece]
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0].float()  # [piece, vocab]
        if previous is not None:
            logits = torch.cat((previous[None], logits))
            targets = ids[0]
        else:
            targets = ids[0, 1:]
        losses.append(F.cross_entropy(logits[:targets.numel()], targets, reduction="none").cpu())
        previous = logits[-1]
    return torch.cat(losses)


def perplexity(nll: torch.Tensor) -> float:
    """Return exp(mean loss) over every element of `nll`."""
    return math.exp(nll.float().mean().item())


def bucket_perplexity(nll: torch.Tensor, bucket: int) -> list[tuple[int, float]]:
    """Return (first position, perplexity) per bucket of `bucket` positions, over all rows of `nll` [rows, n].

    Position p is the loss of token p + 1, predicted from the p + 1 tokens before it.
    """
    return [(start, perplexity(nll[:, start:start + bucket])) for start in range(0, nll.shape[1], bucket)]
