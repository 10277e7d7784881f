"""load_model: the reference model, local folders of several architectures, and rejected models."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, GPT2Config, ModernBertConfig
from transformers import AutoModel, AutoModelForCausalLM

from ctxmem import UnsupportedModelError, load_model
from ctxmem.model import REFERENCE_MODEL_DIR, resolve_device, resolve_dtype
from tests.conftest import TINY_CONFIGS


def test_reference_model_loads_on_cpu(reference):
    model, tokenizer = reference
    assert model.config.model_type == "llama"
    assert model.device.type == "cpu"
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.bos_token == "<|bos|>"


def test_reference_model_is_gqa_rope(reference):
    config = reference[0].config
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.rope_parameters["rope_type"] == "default"
    assert config.max_position_embeddings == 256


def test_reference_model_size_limits(reference):
    model, tokenizer = reference
    parameters = sum(p.numel() for p in model.parameters())
    assert 4.9e6 <= parameters <= 20e6
    assert 2048 <= len(tokenizer) <= 4096
    weights = REFERENCE_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 40 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_local_folder_loads(tiny_model_dir, name):
    folder = tiny_model_dir(name)
    model, tokenizer = load_model(folder, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    logits = model(torch.tensor([tokenizer.encode("To be")])).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_gpt2_rejected_without_rope(tmp_path):
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "'gpt2'" in message
    assert "rotary position embeddings" in message
    assert "llama" in message


def test_bert_rejected_without_rope(tmp_path):
    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'bert' has no rotary position embeddings"):
        load_model(tmp_path)


def test_encoder_with_rope_rejected(tmp_path):
    config = ModernBertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'modernbert' is not a causal language model"):
        load_model(tmp_path)


def test_missing_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "absent")


def test_auto_device_and_dtype():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("dtype", ["float64", "int8", torch.int32])
def test_invalid_dtype_rejected(dtype):
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(dtype, torch.device("cpu"))


def test_invalid_device_rejected():
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        resolve_device("gpu0")
