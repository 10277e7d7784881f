"""Model fingerprints: which model computed a landmark, so that no other model injects it.

Keys and values from one model mean nothing to another, or even to the same architecture with
other weights, config or dtype. A fingerprint records the architecture, the KV shape, the dtype,
a SHA-256 of the config and a SHA-256 of every weight, and the store compares it field by field.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ctxmem.store.records import ModelFingerprint

logger = logging.getLogger(__name__)

# Config entries that describe where or how a model was loaded, not what it computes. dtype is
# a field of its own in the fingerprint.
IGNORED_CONFIG_KEYS = frozenset({
    "transformers_version", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states",
})
_CACHE_ATTRIBUTE = "_ctxmem_weights_hash"  # (state dict signature, hex digest) on the model


def config_hash(config: PretrainedConfig) -> str:
    """Return the SHA-256 hex digest of the config's JSON, keys sorted.

    Private entries (names starting with "_", such as the path it was loaded from) and
    `IGNORED_CONFIG_KEYS` are left out, so one model loaded from two places hashes the same.
    """
    entries = {
        key: value for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in IGNORED_CONFIG_KEYS
    }
    text = json.dumps(entries, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _state_signature(state: dict[str, torch.Tensor]) -> tuple:
    """Return each tensor's name, dtype, shape, device and address: a cache key that reads no data."""
    return tuple(
        (name, str(tensor.dtype), tuple(tensor.shape), tensor.device.type, tensor.data_ptr())
        for name, tensor in sorted(state.items())
    )


def _hash_state(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if tensor.device.type == "meta":
            raise ValueError(f"weight {name!r} is on the meta device, so it has no data to hash; "
                             "load the model without disk offloading")
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # [numel]
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_hash(model: torch.nn.Module, refresh: bool = False) -> str:
    """Return the SHA-256 hex digest of every state-dict tensor's name, dtype, shape and bytes.

    The digest is cached on the model and reused while its tensors keep their names, dtypes,
    shapes and memory addresses, so moving or casting the model recomputes it.
    NOTE: an in-place edit of a weight keeps its address, so the cached digest goes stale;
    pass refresh=True after editing weights in place. Hashing reads every weight once, which
    takes seconds per GB on a CPU.
    """
    state = model.state_dict()
    signature = _state_signature(state)
    cached = getattr(model, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == signature and not refresh:
        return cached[1]

    digest = _hash_state(state)
    object.__setattr__(model, _CACHE_ATTRIBUTE, (signature, digest))
    logger.debug("hashed %d weight tensors of %s: %s", len(state), type(model).__name__, digest[:16])
    return digest


def model_fingerprint(model: PreTrainedModel, refresh: bool = False) -> ModelFingerprint:
    """Return the fingerprint of `model`; see `weights_hash` for caching and `refresh`."""
    config = model.config
    text_config = config.get_text_config()
    heads = text_config.num_attention_heads
    dtype = str(model.dtype).removeprefix("torch.")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"model dtype {dtype} is not supported for landmarks: load the model in "
                         "float32, float16 or bfloat16")
    return ModelFingerprint(
        architecture=type(model).__name__,
        model_type=config.model_type,
        config_hash=config_hash(config),
        weights_hash=weights_hash(model, refresh=refresh),
        layers=text_config.num_hidden_layers,
        kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        dtype=dtype,
    )
