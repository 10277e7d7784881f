"""Model fingerprints of a tiny random Llama: stable, sensitive to weights and dtype, cached."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from ctxmem.fingerprint import config_hash, model_fingerprint
from ctxmem.store.records import fingerprint_differences
from tests.conftest import TINY_CONFIGS


def tiny_llama(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]()).to(dtype)


def test_fingerprint_fields():
    fingerprint = model_fingerprint(tiny_llama())

    assert fingerprint.architecture == "LlamaForCausalLM"
    assert fingerprint.model_type == "llama"
    assert (fingerprint.layers, fingerprint.kv_heads, fingerprint.head_dim) == (2, 2, 16)
    assert fingerprint.dtype == "float32"
    assert len(fingerprint.weights_hash) == 64
    assert len(fingerprint.config_hash) == 64


def test_fingerprint_stable():
    model = tiny_llama()
    first = model_fingerprint(model)

    assert model_fingerprint(model) == first
    assert model_fingerprint(model, refresh=True) == first
    assert model_fingerprint(tiny_llama()) == first


def test_one_weight_changes_hash():
    model = tiny_llama()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 5] += 1e-3

    after = model_fingerprint(model, refresh=True)

    assert [line.split(":")[0] for line in fingerprint_differences(before, after)] == ["weights_hash"]


def test_hash_cached_until_refresh():
    model = tiny_llama()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)

    assert model_fingerprint(model).weights_hash == before.weights_hash
    assert model_fingerprint(model, refresh=True).weights_hash != before.weights_hash


def test_bfloat16_model():
    float32 = model_fingerprint(tiny_llama())
    model = tiny_llama(torch.bfloat16)

    bfloat16 = model_fingerprint(model)

    assert bfloat16.dtype == "bfloat16"
    assert bfloat16.weights_hash != float32.weights_hash
    assert bfloat16.config_hash == float32.config_hash
    assert model_fingerprint(model) == bfloat16


def test_cast_invalidates_cache():
    model = tiny_llama()
    float32 = model_fingerprint(model)

    model.to(torch.bfloat16)

    assert model_fingerprint(model).weights_hash != float32.weights_hash


def test_config_hash_ignores_load_path():
    config = TINY_CONFIGS["llama-gqa"]()
    moved = TINY_CONFIGS["llama-gqa"]()
    moved._name_or_path = "/somewhere/else"
    changed = TINY_CONFIGS["llama-gqa"]()
    changed.rope_parameters["rope_theta"] = 5000.0

    assert config_hash(moved) == config_hash(config)
    assert config_hash(changed) != config_hash(config)
