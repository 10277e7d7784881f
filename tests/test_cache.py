"""The bounded streaming cache against an independent path: a fresh forward over what it keeps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctxmem.cache import StreamingCache
from ctxmem.rope import rotary_spec
from tests.conftest import TINY_CONFIGS


def one_layer_model(name: str):
    config = TINY_CONFIGS[name]()
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def stream(model, ids: list[int], cache: StreamingCache, piece: int) -> tuple[torch.Tensor, list[int]]:
    """Feed `ids` in pieces; return the last logits and the token ids the cache keeps, in order."""
    kept_ids: list[int] = []
    logits = None
    for start in range(0, len(ids), piece):
        chunk = ids[start:start + piece]
        evicted = cache.make_room(len(chunk))
        del kept_ids[cache.pinned:cache.pinned + evicted]
        positions = cache.positions(len(chunk))
        logits = model(torch.tensor([chunk]), cache=cache, position_ids=positions, use_cache=True).logits
        kept_ids += chunk
    return logits[0, -1], kept_ids


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("piece", [1, 7])
def test_one_layer_matches_fresh_forward(name, piece):
    model = one_layer_model(name)
    cache = StreamingCache(num_layers=1, capacity=40, pinned=4, chunk=8, spec=rotary_spec(model))
    ids = torch.randint(10, 3000, (150,), generator=torch.Generator().manual_seed(1)).tolist()

    last_logits, kept_ids = stream(model, ids, cache, piece)
    fresh = model(torch.tensor([kept_ids])).logits[0, -1]

    assert cache.evicted_tokens > 0
    assert cache.length == len(kept_ids) <= cache.capacity
    assert torch.allclose(last_logits, fresh, atol=1e-4), (last_logits - fresh).abs().max()


def test_overflowing_input_rejected():
    model = one_layer_model("llama-gqa")
    cache = StreamingCache(num_layers=1, capacity=16, pinned=4, chunk=4, spec=rotary_spec(model))
    stream(model, list(range(10, 20)), cache, piece=10)
    with pytest.raises(ValueError, match="cannot fit beside 4 pinned entries"):
        cache.make_room(13)
