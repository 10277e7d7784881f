"""Pass-key retrieval at a distance: prompt layout, accuracy inside and beyond the window, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ctxmem.cli import main
from ctxmem.config import CacheConfig, LandmarkConfig
from ctxmem.eval import passkey
from ctxmem.eval.reference_checks import pass_key_ids
from ctxmem.reference import corpus

CTXMEM = [str(Path(sys.executable).parent / "ctxmem")]


@pytest.fixture(scope="module")
def filler_ids(reference) -> list[int]:
    _, tokenizer = reference
    return tokenizer.encode(corpus.load_play(corpus.HELD_OUT_PLAYS[0]), add_special_tokens=False)


def find(ids: list[int], part: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(part) + 1) if ids[i:i + len(part)] == part]


@pytest.mark.parametrize("distance", [1, 100, 1024])
def test_prompt_places_statement_at_distance(reference, filler_ids, distance):
    _, tokenizer = reference
    prompt = passkey.make_prompt(tokenizer, filler_ids, distance, random.Random(3))
    statement, question = pass_key_ids(tokenizer, prompt.key)
    ids = prompt.ids

    starts = find(ids, statement)
    assert len(starts) == 1
    question_start = len(ids) - len(question)
    assert ids[question_start:] == question
    assert question_start - (starts[0] + len(statement)) == distance
    assert prompt.distance == distance
    assert ids[0] == tokenizer.bos_token_id
    assert passkey.PREFIX_TOKENS[0] <= starts[0] - 1 <= passkey.PREFIX_TOKENS[1]
    assert find(filler_ids, ids[starts[0] + len(statement):question_start])  # one contiguous span of the text


def test_prompts_repeat_for_a_seed(reference, filler_ids):
    _, tokenizer = reference
    first = passkey.make_prompt(tokenizer, filler_ids, 50, random.Random("passkey:0:50"))
    second = passkey.make_prompt(tokenizer, filler_ids, 50, random.Random("passkey:0:50"))
    assert first == second


def test_streaming_answers_inside_window(reference, filler_ids):
    model, tokenizer = reference
    result = passkey.evaluate(model, tokenizer, filler_ids, "streaming", CacheConfig(),
                              distances=[100], trials=5)
    assert result.method == "streaming"
    assert result.distances[0].trials == 5
    assert result.distances[0].accuracy >= 0.8


def test_dense_matches_streaming_before_eviction(reference, filler_ids):
    # The longest prompt at distance 100 (BOS, 96 prefix, statement, filler, question, answer)
    # stays under the 256 positions, so no chunk is evicted and both methods see the same context.
    model, tokenizer = reference
    dense = passkey.evaluate(model, tokenizer, filler_ids, "dense", CacheConfig(), distances=[100], trials=3)
    streaming = passkey.evaluate(model, tokenizer, filler_ids, "streaming", CacheConfig(),
                                 distances=[100], trials=3)
    assert [a.answer for a in dense.answers] == [a.answer for a in streaming.answers]


def test_streaming_forgets_evicted_statement(reference, filler_ids):
    # 1,024 filler tokens push the statement out of the 252-token window before the question, and
    # a random five-digit key is guessed with a chance of 1 in 90,000.
    model, tokenizer = reference
    result = passkey.evaluate(model, tokenizer, filler_ids, "streaming", CacheConfig(),
                              distances=[1024], trials=3)
    assert result.distances[0].accuracy == 0.0
    assert all(not answer.correct for answer in result.answers)


def test_landmarks_fill_slots_on_long_prompt(reference, filler_ids):
    model, tokenizer = reference
    config = CacheConfig(landmark_slots=2)
    stream = passkey.build_stream(model, tokenizer, "landmarks", config, LandmarkConfig())
    prompt = passkey.make_prompt(tokenizer, filler_ids, 400, random.Random(5))
    answer = passkey.stream_answer(stream, prompt)
    assert len(answer) == passkey.ANSWER_TOKENS
    assert len(stream.memory.landmarks) >= 3
    assert stream.cache.landmarks == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"distances": [0]}, "invalid distance 0"),
    ({"distances": []}, "no distances given"),
    ({"trials": 0}, "invalid trials 0"),
    ({"distances": [100_000]}, "fewer than the 100000"),
    ({"method": "window"}, "unknown method 'window'"),
])
def test_evaluate_rejects_bad_input(reference, filler_ids, kwargs, message):
    model, tokenizer = reference
    arguments = {"method": "streaming", "distances": [64], "trials": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        passkey.evaluate(model, tokenizer, filler_ids, config=CacheConfig(), **arguments)


def test_landmarks_need_slots(reference, filler_ids):
    model, tokenizer = reference
    with pytest.raises(ValueError, match="0 landmark slots"):
        passkey.evaluate(model, tokenizer, filler_ids, "landmarks", CacheConfig(), distances=[64], trials=1)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CTXMEM + ["eval", "passkey", *args], capture_output=True, text=True, timeout=300)


def test_cli_json_reports_each_distance():
    result = run("--method", "streaming", "--distances", "64,512", "--trials", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"method", "distances"}
    assert report["method"] == "streaming"
    assert [entry["distance"] for entry in report["distances"]] == [64, 512]
    for entry in report["distances"]:
        assert set(entry) == {"distance", "accuracy", "trials"}
        assert entry["trials"] == 2
        assert isinstance(entry["accuracy"], float)
        assert 0.0 <= entry["accuracy"] <= 1.0


@pytest.mark.parametrize("args, message", [
    (["--distances", "512,abc"], "invalid --distances entry 'abc'"),
    (["--distances", "0"], "invalid --distances entry 0"),
    (["--distances", "64,64"], "distance 64 is listed twice"),
    (["--trials", "0"], "invalid --trials 0"),
    (["--filler", "missing.txt"], "filler file 'missing.txt' not found"),
    (["--filler", "{short}", "--distances", "512"], "fewer than the 512"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, args, message):
    # In-process through main(), the CLI's entry point, because a new process per case costs
    # seconds of imports.
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    argv = [str(short) if arg == "{short}" else arg for arg in args]
    code = main(["eval", "passkey", "--device", "cpu", *argv])
    stderr = capsys.readouterr().err
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
