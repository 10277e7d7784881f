"""Perplexity by sequence length (ctxmem.eval.length): sequences, per-position losses, cached pieces."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctxmem import RopeScaling
from ctxmem.eval.length import bucket_perplexity, perplexity, position_nll, sequences
from ctxmem.rope_scaling import apply_rope_scaling
from tests.conftest import TINY_CONFIGS
from tests.test_cache import random_ids

BOS = 1


def tiny(trained: int = 64, scaling: RopeScaling | None = None):
    config = TINY_CONFIGS["llama-gqa"]()
    config.max_position_embeddings = trained
    if scaling is not None:
        apply_rope_scaling(config, scaling)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_sequences_evenly_spaced_with_bos():
    ids = list(range(100, 200))
    rows = sequences(ids, length=11, count=3, bos_id=BOS)
    assert rows.shape == (3, 11)
    assert rows[:, 0].tolist() == [BOS, BOS, BOS]
    assert rows[0, 1:].tolist() == ids[:10]
    assert rows[-1, 1:].tolist() == ids[-10:]
    assert rows[1, 1].item() == ids[45]


def test_sequences_without_bos():
    rows = sequences(list(range(50)), length=10, count=2, bos_id=None)
    assert rows.tolist() == [list(range(10)), list(range(40, 50))]


def test_sequences_reject_short_text():
    with pytest.raises(ValueError, match="the text has 9 tokens, fewer than one sequence of 11 needs"):
        sequences(list(range(9)), length=11, count=1, bos_id=BOS)


def test_position_nll_matches_model_loss():
    model = tiny()
    rows = sequences(random_ids(500), length=40, count=5, bos_id=BOS)
    nll = position_nll(model, rows, batch_tokens=80)  # 2 rows per forward
    assert nll.shape == (5, 39)
    with torch.no_grad():
        loss = model(input_ids=rows, labels=rows).loss.item()
    assert nll.mean().item() == pytest.approx(loss, rel=1e-5)
    assert perplexity(nll) == pytest.approx(math.exp(loss), rel=1e-5)


def test_cached_pieces_equal_one_pass():
    model = tiny()
    rows = sequences(random_ids(500), length=150, count=2, bos_id=BOS)
    whole = position_nll(model, rows)
    pieces = position_nll(model, rows, piece=32)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)


def test_dynamic_ntk_cached_differs_past_trained_length():
    # Dynamic NTK recomputes the frequencies as the length grows, but cached keys keep the old
    # rotation, so decoding in pieces and one forward pass disagree past the trained 64 positions.
    model = tiny(trained=64, scaling=RopeScaling(method="dynamic-ntk", factor=4))
    short = sequences(random_ids(500), length=64, count=2, bos_id=BOS)
    torch.testing.assert_close(position_nll(model, short, piece=16), position_nll(model, short),
                               rtol=1e-4, atol=1e-4)
    long = sequences(random_ids(500), length=200, count=2, bos_id=BOS)
    difference = (position_nll(model, long, piece=16) - position_nll(model, long)).abs()
    assert difference[:, 63:].max().item() > 1e-3


def test_bucket_perplexity():
    nll = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert bucket_perplexity(nll, 2) == [(0, 1.0), (2, pytest.approx(math.e))]
