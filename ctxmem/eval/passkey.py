"""Pass-key retrieval at chosen distances, for `ctxmem eval passkey`.

Each trial states a random five-digit key, follows it with `distance` tokens of filler text,
asks for the key and decodes the answer greedily. The statement comes after a random filler
prefix of 32 to 96 tokens, so it never sits inside the pinned sinks: a bounded cache answers
only while the statement is still in its window, or through what its landmarks keep.

Methods:
- `dense`: one growing cache at absolute positions, the baseline (fails past the trained length);
- `streaming`: ctxmem's cache, sinks plus a re-rotated window;
- `landmarks`: streaming with a landmark memory filling the cache's landmark slots.
Trial prompts depend only on the seed and the distance, so every method sees the same keys.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import BaseModel
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.config import PASS_KEY_METHODS as METHODS, SYSTEM_SINKS, CacheConfig, LandmarkConfig
from ctxmem.eval.reference_checks import is_pass_key_answer, pass_key_ids
from ctxmem.landmarks.memory import LandmarkMemory
from ctxmem.reference import synthetic
from ctxmem.rope import rotary_spec
from ctxmem.stream import Stream

logger = logging.getLogger(__name__)

PREFIX_TOKENS = (32, 96)  # the range of the filler prefix's length before the statement
ANSWER_TOKENS = 8  # a five-digit key is 5 single-digit tokens, plus the leading space and the period
DENSE_PIECE = 512  # prompt tokens per forward pass of `dense`, which bounds its attention scores in memory
Progress = Callable[[int], None]  # called with the number of trials just finished


class DistanceAccuracy(BaseModel):
    distance: int
    accuracy: float
    trials: int


class TrialAnswer(BaseModel):
    distance: int
    key: str
    answer: str
    correct: bool


class PassKeyResult(BaseModel):
    """Accuracy per distance, and every trial's key and decoded answer."""

    method: str
    distances: list[DistanceAccuracy]
    answers: list[TrialAnswer]


@dataclass(frozen=True)
class PassKeyPrompt:
    """One trial: `context` is BOS + prefix + statement + filler, `question` follows it."""

    key: str
    context: list[int]
    question: list[int]
    statement_end: int  # index in `context` just after the statement's last token

    @property
    def ids(self) -> list[int]:
        return self.context + self.question

    @property
    def distance(self) -> int:
        """Filler tokens between the end of the statement and the start of the question."""
        return len(self.context) - self.statement_end


def make_prompt(tokenizer: PreTrainedTokenizerBase, filler_ids: list[int], distance: int,
                rng: random.Random) -> PassKeyPrompt:
    """Build one trial's prompt with a random key and random spans of `filler_ids`."""
    key = synthetic.pass_key(rng)
    statement, question = pass_key_ids(tokenizer, key)
    prefix = _span(filler_ids, rng.randint(*PREFIX_TOKENS), rng)
    filler = _span(filler_ids, distance, rng)
    head = [tokenizer.bos_token_id] + prefix + statement
    return PassKeyPrompt(key=key, context=head + filler, question=question, statement_end=len(head))


def _span(ids: list[int], length: int, rng: random.Random) -> list[int]:
    start = rng.randrange(len(ids) - length + 1)
    return ids[start:start + length]


def build_stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: str, config: CacheConfig,
                 landmarks: LandmarkConfig | None) -> Stream:
    """Return a fresh Stream for `streaming`, or for `landmarks` one with a memory built from `landmarks`.

    The landmark settings pass through unchanged, and LandmarkMemory and Stream check that the
    cache config reserves the slots they need, so any policy that LandmarkMemory supports works here.
    """
    if config.sinks == SYSTEM_SINKS:
        raise ValueError("pass-key prompts have no system message to pin; use a number of sinks, such as 4")
    if method != "landmarks":
        return Stream(model, config)
    memory = LandmarkMemory(model, rotary_spec(model), landmarks or LandmarkConfig(), config.landmark_slots,
                            decode=tokenizer.decode)
    return Stream(model, config, memory=memory)


def stream_answer(stream: Stream, prompt: PassKeyPrompt) -> list[int]:
    """Feed the context through the bounded cache, then decode the answer to the question greedily."""
    stream.feed(prompt.context)
    return list(stream.generate(prompt.question, max_new_tokens=ANSWER_TOKENS))


@torch.no_grad()
def dense_answer(model: PreTrainedModel, prompt: PassKeyPrompt) -> list[int]:
    """Decode the answer greedily with every prompt token cached at its absolute position."""
    cache = DynamicCache(config=model.config)
    ids = prompt.ids
    for start in range(0, len(ids), DENSE_PIECE):
        piece = torch.tensor([ids[start:start + DENSE_PIECE]], device=model.device)  # [1, piece]
        output = model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1)
        logits = output.logits[0, -1]  # [vocab]
    answer = []
    for _ in range(ANSWER_TOKENS):
        token = int(logits.argmax())
        answer.append(token)
        step = torch.tensor([[token]], device=model.device)  # [1, 1]
        logits = model(input_ids=step, cache=cache, use_cache=True).logits[0, -1]
    return answer


def check_inputs(filler_ids: list[int], method: str, distances: list[int], trials: int) -> None:
    """Raise ValueError naming the first invalid method, distance, trial count or too short filler."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    if not distances:
        raise ValueError("no distances given; pass at least one, such as 512")
    for distance in distances:
        if distance < 1:
            raise ValueError(f"invalid distance {distance}; use 1 or more tokens")
    if trials < 1:
        raise ValueError(f"invalid trials {trials}; use 1 or more")
    needed = max(max(distances), PREFIX_TOKENS[1])
    if len(filler_ids) < needed:
        raise ValueError(f"the filler text has {len(filler_ids)} tokens, fewer than the {needed} that one "
                         "span needs (the largest distance, and at least 96 for the prefix); "
                         "pass a longer filler text or smaller distances")


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, filler_ids: list[int], method: str,
             config: CacheConfig, landmarks: LandmarkConfig | None = None, distances: list[int] = (512,),
             trials: int = 10, seed: int = 0, progress: Progress | None = None) -> PassKeyResult:
    """Measure pass-key accuracy under `method` over `trials` prompts at each distance.

    `filler_ids` (without BOS) supplies the prefix and the filler. Each must fit in it whole,
    so it needs at least max(distances) and 96 tokens. The streaming methods start a fresh
    Stream per trial, so no trial's cache contains another trial's key.
    """
    check_inputs(filler_ids, method, list(distances), trials)
    progress = progress or (lambda n: None)
    accuracies, answers = [], []
    for distance in distances:
        rng = random.Random(f"passkey:{seed}:{distance}")
        correct = 0
        for _ in range(trials):
            prompt = make_prompt(tokenizer, filler_ids, distance, rng)
            answer = _answer(model, tokenizer, method, config, landmarks, prompt)
            text = tokenizer.decode(answer)
            hit = is_pass_key_answer(text, prompt.key)
            verdict = "correct" if hit else "wrong"
            logger.debug("distance %d: key %s, answer %r, %s", distance, prompt.key, text, verdict)
            answers.append(TrialAnswer(distance=distance, key=prompt.key, answer=text, correct=hit))
            correct += hit
            progress(1)
        accuracies.append(DistanceAccuracy(distance=distance, accuracy=correct / trials, trials=trials))
        logger.info("%s at distance %d: %d of %d correct", method, distance, correct, trials)
    return PassKeyResult(method=method, distances=accuracies, answers=answers)


def _answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: str, config: CacheConfig,
            landmarks: LandmarkConfig | None, prompt: PassKeyPrompt) -> list[int]:
    if method == "dense":
        return dense_answer(model, prompt)
    return stream_answer(build_stream(model, tokenizer, method, config, landmarks), prompt)
