"""The reference model matches its model card inside its 256-token context."""

from __future__ import annotations

import json

import pytest

from ctxmem.eval import reference_checks as checks
from ctxmem.model import REFERENCE_MODEL_DIR
from ctxmem.reference import corpus


@pytest.fixture(scope="module")
def card_metrics() -> dict:
    return json.loads((REFERENCE_MODEL_DIR / "metrics.json").read_text())


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}")


def test_held_out_perplexity_matches_card(reference, held_out_text, card_metrics, capsys):
    measured = checks.perplexity(*reference, held_out_text)
    report(capsys, f"held-out perplexity {measured:.3f} (card {card_metrics['held_out_perplexity']:.3f})")
    assert measured == pytest.approx(card_metrics["held_out_perplexity"], rel=0.02)


def test_tool_calls_name_right_tool(reference, capsys):
    rate = checks.tool_call_accuracy(*reference, count=50)
    report(capsys, f"tool-call accuracy on 50 held-out prompts: {rate:.0%}")
    assert rate >= 0.9


def test_pass_key_in_window(reference, held_out_text, capsys):
    rate = checks.pass_key_accuracy(*reference, held_out_text, count=50)
    report(capsys, f"in-window pass-key accuracy on 50 prompts: {rate:.0%}")
    assert rate >= 0.9


def test_second_copy_of_random_span_learned(reference, capsys):
    ratio = checks.repeat_loss_ratio(*reference, span=40)
    report(capsys, f"loss on second copy / first copy of a random 40-token span: {ratio:.3f}")
    assert ratio <= 0.2


def test_copy_measurements_match_card(reference, held_out_text, card_metrics):
    # The card states what the tests above measure, so it must agree with them.
    pass_key = checks.pass_key_accuracy(*reference, held_out_text, count=50)
    ratio = checks.repeat_loss_ratio(*reference, span=40)
    assert pass_key == pytest.approx(card_metrics["pass_key_accuracy"], abs=0.06)
    assert ratio == pytest.approx(card_metrics["repeat_loss_ratio"], rel=0.02)


def test_model_card_names_held_out_plays():
    card = (REFERENCE_MODEL_DIR / "MODEL_CARD.md").read_text()
    for play in corpus.HELD_OUT_PLAYS:
        assert play in card
    assert "command:" in card


def test_held_out_plays_not_in_training():
    training = set(corpus.training_play_names())
    assert not training & set(corpus.HELD_OUT_PLAYS)
    assert len(training) + len(corpus.HELD_OUT_PLAYS) == len(corpus.play_names())
