"""Model loading: the bundled reference model, a local folder, or a hub id.

ctxmem works on decoder-only causal language models with rotary position embeddings (RoPE),
because its cache re-rotates keys to new positions. Anything else is rejected here, before any
weights load, with an error that names the model type.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ctxmem.rope_scaling import RopeScaling, apply_rope_scaling

logger = logging.getLogger(__name__)

REFERENCE_MODEL_NAME = "reference"
REFERENCE_MODEL_DIR = Path(__file__).parent / "reference" / "model"
SUPPORTED_EXAMPLES = "llama, mistral, qwen2, qwen3, gemma, gemma2, phi3"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only causal LM with rotary position embeddings."""


def resolve_source(name_or_path: str | os.PathLike) -> str:
    """Return the folder or hub id that transformers should load for `name_or_path`."""
    if str(name_or_path) == REFERENCE_MODEL_NAME:
        if not (REFERENCE_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the reference model is missing from {REFERENCE_MODEL_DIR}; reinstall ctxmem "
                "or rebuild it with `make reference-model`"
            )
        return str(REFERENCE_MODEL_DIR)
    path = Path(name_or_path).expanduser()
    if path.exists() or path.is_absolute() or str(name_or_path).startswith("."):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(name_or_path)!r} not found or has no config.json; "
                                    "pass 'reference', a folder saved with save_pretrained, or a hub id")
        return str(path)
    return str(name_or_path)


def resolve_device(device: str | torch.device) -> torch.device:
    """Return the torch device for `device`; "auto" picks CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"invalid device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from error


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Return the torch dtype for `dtype`; "auto" is bfloat16 on CUDA and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of: auto, {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_supported(config: PretrainedConfig) -> None:
    """Raise UnsupportedModelError unless `config` is a causal LM with rotary position embeddings."""
    model_type = getattr(config, "model_type", "unknown")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a causal language model; ctxmem supports "
            f"decoder-only causal LMs with rotary position embeddings (RoPE), such as {SUPPORTED_EXAMPLES}"
        )
    if not getattr(config, "rope_parameters", None):
        raise UnsupportedModelError(
            f"model type {model_type!r} has no rotary position embeddings (RoPE); ctxmem supports "
            f"decoder-only causal LMs with RoPE, such as {SUPPORTED_EXAMPLES}"
        )


def load_model(
    name_or_path: str | os.PathLike = REFERENCE_MODEL_NAME,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    rope: RopeScaling | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a RoPE causal LM and its tokenizer, in eval mode on `device`.

    `name_or_path` is "reference" (the model bundled with ctxmem), a local folder, or a hub id
    (which needs network access). `rope` applies a RoPE scaling preset to the config before the
    weights load (see ctxmem.rope_scaling). Raises UnsupportedModelError for a model that is not
    a decoder-only causal LM with RoPE, and ValueError for a preset that the model cannot take.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = resolve_source(name_or_path)

    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as error:
        raise FileNotFoundError(
            f"cannot load model {source!r}: {str(error).strip().rstrip('.')}; check the hub id and network access "
            "(HF_HUB_OFFLINE=1 allows only cached models), or pass a local folder"
        ) from error
    check_supported(config)
    if rope is not None:
        apply_rope_scaling(config, rope)

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch_dtype)
    model.to(torch_device).eval()
    logger.debug("loaded %s (%s) on %s as %s", source, config.model_type, torch_device, torch_dtype)
    return model, tokenizer
