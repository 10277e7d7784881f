"""RoPE scaling presets: inverse frequencies per method and architecture, saving, bad requests.

Expected frequencies are computed here from the formulas, not with ctxmem's or transformers'
helpers: theta_i = base ** (-2i / d) for i < d / 2, where d is the rotary dimension.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Phi3Config

from ctxmem import RopeScaling, load_model
from ctxmem.rope_scaling import apply_rope_scaling, max_cache_positions
from tests.conftest import TINY_CONFIGS

ARCHITECTURES = sorted(TINY_CONFIGS)
# Rotary dimension of each tiny config: head_dim, times partial_rotary_factor 0.5 for Phi.
ROTARY_DIMS = {"llama-gqa": 16, "mistral": 32, "qwen2": 16, "gemma-head-dim-48": 48, "phi-partial-rotary": 8}
BASE = 10000.0
FACTOR = 4.0
YARN_FACTOR = 16.0


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def rotary_of(model) -> torch.nn.Module:
    return model.get_decoder().rotary_emb


def assert_frequencies(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=2e-6, atol=0)


def tiny_config(name: str, trained_length: int):
    config = TINY_CONFIGS[name]()
    config.max_position_embeddings = trained_length
    return config


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_pi_divides_every_frequency(tiny_model_dir, name):
    trained = TINY_CONFIGS[name]().max_position_embeddings
    model, _ = load_model(tiny_model_dir(name), device="cpu", rope=RopeScaling(method="pi", factor=FACTOR))

    parameters = model.config.rope_parameters
    assert parameters["rope_type"] == "linear"
    assert parameters["factor"] == FACTOR
    assert parameters["rope_theta"] == BASE
    assert model.config.max_position_embeddings == trained * FACTOR
    assert model.config.original_max_position_embeddings == trained
    assert_frequencies(rotary_of(model).inv_freq, default_inv_freq(BASE, ROTARY_DIMS[name]) / FACTOR)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ntk_raises_base(tiny_model_dir, name):
    trained = TINY_CONFIGS[name]().max_position_embeddings
    dim = ROTARY_DIMS[name]
    model, _ = load_model(tiny_model_dir(name), device="cpu", rope=RopeScaling(method="ntk", factor=FACTOR))

    parameters = model.config.rope_parameters
    new_base = BASE * FACTOR ** (dim / (dim - 2))
    assert parameters["rope_type"] == "default"
    assert parameters["rope_theta"] == pytest.approx(new_base, rel=1e-12)
    assert model.config.max_position_embeddings == trained * FACTOR
    assert model.config.original_max_position_embeddings == trained

    inv_freq = rotary_of(model).inv_freq
    unscaled = default_inv_freq(BASE, dim)
    assert_frequencies(inv_freq, default_inv_freq(new_base, dim))
    # The highest frequency keeps its speed and the lowest turns exactly FACTOR times slower.
    assert inv_freq[0].item() == pytest.approx(unscaled[0].item(), rel=1e-6)
    assert inv_freq[-1].item() == pytest.approx(unscaled[-1].item() / FACTOR, rel=1e-5)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_dynamic_ntk_inert_inside_trained_length(tiny_model_dir, name):
    trained = TINY_CONFIGS[name]().max_position_embeddings
    dim = ROTARY_DIMS[name]
    model, _ = load_model(tiny_model_dir(name), device="cpu",
                          rope=RopeScaling(method="dynamic-ntk", factor=FACTOR))

    assert model.config.rope_parameters["rope_type"] == "dynamic"
    assert model.config.rope_parameters["factor"] == FACTOR
    assert model.config.max_position_embeddings == trained
    assert max_cache_positions(model.config) == trained
    rotary = rotary_of(model)
    unscaled = default_inv_freq(BASE, dim)
    assert_frequencies(rotary.inv_freq, unscaled)

    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[0, 1, 2]]))
    assert_frequencies(rotary.inv_freq, unscaled)

    # Past the trained length transformers recomputes the base from the longest position seen.
    seq_len = 2 * trained + 3
    positions = torch.arange(seq_len - 3, seq_len)[None]
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), position_ids=positions)
    grown_base = BASE * (FACTOR * seq_len / trained - (FACTOR - 1)) ** (dim / (dim - 2))
    assert_frequencies(rotary.inv_freq, default_inv_freq(grown_base, dim))
    assert_frequencies(rotary.original_inv_freq, unscaled)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_yarn_ramp_endpoints(name):
    trained = 2048
    dim = ROTARY_DIMS[name]
    config = apply_rope_scaling(tiny_config(name, trained), RopeScaling(method="yarn", factor=YARN_FACTOR))
    model = AutoModelForCausalLM.from_config(config)

    parameters = model.config.rope_parameters
    assert parameters["rope_type"] == "yarn"
    assert parameters["factor"] == YARN_FACTOR
    assert parameters["original_max_position_embeddings"] == trained
    assert model.config.max_position_embeddings == trained * YARN_FACTOR

    rotary = rotary_of(model)
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(YARN_FACTOR) + 1)
    assert rotary.attention_scaling > 1

    # YaRN keeps frequencies that turn more than 32 times within the trained length and divides
    # those that turn less than once by the factor. At 2048 positions the highest frequency turns
    # 2048 / (2 pi) times and the lowest less than once, in every tiny config.
    unscaled = default_inv_freq(BASE, dim)
    ratio = rotary.inv_freq.double() / unscaled
    assert ratio[0].item() == pytest.approx(1.0, rel=1e-6)
    assert ratio[-1].item() == pytest.approx(1 / YARN_FACTOR, rel=1e-6)
    assert torch.all(ratio[1:] <= ratio[:-1] + 1e-7)


def test_yarn_partial_when_lowest_turns_often(tiny_model_dir):
    # Over Qwen2's 32768 trained positions the lowest frequency (wavelength 2 pi * 10000 ** (14/16),
    # about 19869) turns 1.6 times. That is inside YaRN's ramp, so it is only partly interpolated.
    model, _ = load_model(tiny_model_dir("qwen2"), device="cpu",
                          rope=RopeScaling(method="yarn", factor=YARN_FACTOR))

    assert model.config.rope_parameters["original_max_position_embeddings"] == 32768
    ratio = rotary_of(model).inv_freq.double() / default_inv_freq(BASE, ROTARY_DIMS["qwen2"])
    assert ratio[0].item() == pytest.approx(1.0, rel=1e-6)
    assert 1 / YARN_FACTOR + 0.01 < ratio[-1].item() < 0.99


@pytest.mark.parametrize("name", ["llama-gqa", "phi-partial-rotary"])
@pytest.mark.parametrize("method", ["pi", "ntk", "dynamic-ntk", "yarn"])
def test_scaled_model_survives_reload(tiny_model_dir, tmp_path, name, method):
    model, _ = load_model(tiny_model_dir(name), device="cpu", rope=RopeScaling(method=method, factor=FACTOR))
    model.save_pretrained(tmp_path / "scaled")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "scaled")

    assert reloaded.config.rope_parameters == model.config.rope_parameters
    assert reloaded.config.max_position_embeddings == model.config.max_position_embeddings
    assert max_cache_positions(reloaded.config) == max_cache_positions(model.config)
    assert torch.equal(rotary_of(reloaded).inv_freq, rotary_of(model).inv_freq)
    assert rotary_of(reloaded).attention_scaling == rotary_of(model).attention_scaling
    if name == "phi-partial-rotary":
        assert reloaded.config.rope_parameters["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn"])
def test_static_presets_record_trained_length(method):
    config = apply_rope_scaling(tiny_config("llama-gqa", 2048), RopeScaling(method=method, factor=2.5))

    assert config.max_position_embeddings == 5120
    assert config.original_max_position_embeddings == 2048
    assert max_cache_positions(config) == 5120


def test_none_leaves_config_unchanged():
    config = tiny_config("phi-partial-rotary", 2048)
    before = config.to_dict()

    assert apply_rope_scaling(config, RopeScaling()) is config
    assert config.to_dict() == before
    assert max_cache_positions(config) == 2048


def test_longrope_range_is_original_length():
    short_factors = [1.0] * 8
    config = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192,
                        original_max_position_embeddings=2048,
                        rope_parameters={"rope_type": "longrope", "rope_theta": BASE, "factor": 4.0,
                                         "short_factor": short_factors, "long_factor": [2.0] * 8})

    assert max_cache_positions(config) == 2048


def test_per_layer_type_config():
    config = Gemma3TextConfig(max_position_embeddings=4096)

    assert max_cache_positions(config) == 4096
    with pytest.raises(ValueError, match="'gemma3_text' sets rope_parameters per layer type"):
        apply_rope_scaling(config, RopeScaling(method="pi", factor=2))


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"method": "foo", "factor": 2}, "'foo'"),
        ({"method": "pi", "factor": 0.5}, "factor 0.5"),
        ({"method": "none", "factor": 0.5}, "factor 0.5"),
        ({"method": "yarn", "factor": float("inf")}, "factor inf"),
        ({"method": "pi", "factor": 1}, "'pi' needs a factor > 1, but received factor 1"),
        ({"method": "none", "factor": 4}, "factor 4.0 has no effect with method 'none'"),
    ],
)
def test_invalid_request_rejected(request_fields, named):
    with pytest.raises(ValueError, match=named):
        RopeScaling(**request_fields)


def test_invalid_method_lists_choices():
    with pytest.raises(ValueError) as error:
        RopeScaling(method="foo", factor=2)

    assert "none, pi, ntk, dynamic-ntk, yarn" in str(error.value)


def test_model_without_rope_rejected():
    with pytest.raises(ValueError, match="'gpt2' has no rope_parameters"):
        apply_rope_scaling(GPT2Config(n_layer=1), RopeScaling(method="pi", factor=2))
    with pytest.raises(ValueError, match="'gpt2' has no rope_parameters"):
        max_cache_positions(GPT2Config(n_layer=1))


def test_shipped_scaling_not_stacked():
    config = LlamaConfig(max_position_embeddings=8192,
                         rope_parameters={"rope_type": "yarn", "rope_theta": BASE, "factor": 4.0,
                                          "original_max_position_embeddings": 2048})

    with pytest.raises(ValueError) as error:
        apply_rope_scaling(config, RopeScaling(method="pi", factor=2))

    assert "rope_type 'yarn'" in str(error.value)
    assert "method 'pi'" in str(error.value)
    assert config.rope_parameters["rope_type"] == "yarn"


def test_ntk_twice_rejected():
    config = apply_rope_scaling(tiny_config("llama-gqa", 2048), RopeScaling(method="ntk", factor=2))
    scaled_base = config.rope_parameters["rope_theta"]

    with pytest.raises(ValueError, match="already extended from original_max_position_embeddings 2048"):
        apply_rope_scaling(config, RopeScaling(method="ntk", factor=2))
    assert config.rope_parameters["rope_theta"] == scaled_base
    assert config.max_position_embeddings == 4096


def test_ntk_needs_rotary_dim_above_two():
    config = LlamaConfig(hidden_size=8, num_attention_heads=4, max_position_embeddings=2048)

    with pytest.raises(ValueError, match="rotary dimension above 2, but the model rotates 2"):
        apply_rope_scaling(config, RopeScaling(method="ntk", factor=2))


def test_reference_model_yarn_forward(held_out_text):
    model, tokenizer = load_model("reference", device="cpu", rope=RopeScaling(method="yarn", factor=4))
    ids = tokenizer(held_out_text, return_tensors="pt").input_ids[:, :600]
    assert ids.shape[1] == 600
    assert max_cache_positions(model.config) == 1024

    with torch.no_grad():
        logits = model(ids).logits

    assert logits.shape == (1, 600, model.config.vocab_size)
    assert torch.isfinite(logits).all()
