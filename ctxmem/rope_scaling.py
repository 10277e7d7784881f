"""RoPE scaling presets that extend a model's positions past its trained context length.

A RoPE model has only seen positions below the length it was trained on. Each preset rewrites
the `rope_parameters` of a transformers 5 config before the weights load, so the model's own
rotary embedding module computes the scaled inverse frequencies:

- "pi": position interpolation (transformers rope_type "linear"): every frequency is divided
  by the factor F.
- "ntk": static NTK-aware scaling. The rope_type stays "default" and the base becomes
  base * F ** (d / (d - 2)), where d is the rotary dimension.
- "dynamic-ntk": transformers' rope_type "dynamic". The base grows only when a forward pass
  reaches positions beyond the trained length, and stays unchanged inside it.
- "yarn": YaRN (rope_type "yarn"). It interpolates the low frequencies, keeps the high ones
  and multiplies cos and sin by the attention factor 0.1 * ln(F) + 1.

ctxmem's streaming cache keeps every position inside [0, capacity), so a preset matters only
when the capacity exceeds the trained length. `max_cache_positions` returns the number of
positions that a (possibly scaled) config supports.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

ScalingMethod = Literal["none", "pi", "ntk", "dynamic-ntk", "yarn"]
SCALING_METHODS: tuple[str, ...] = get_args(ScalingMethod)

# The transformers rope_type that each method writes. "ntk" keeps the unscaled type and changes the base.
ROPE_TYPES = {"pi": "linear", "ntk": "default", "dynamic-ntk": "dynamic", "yarn": "yarn"}


class RopeScaling(BaseModel):
    """A RoPE scaling request: the method and the factor F by which it extends the context."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: ScalingMethod = "none"
    factor: float = 1.0

    @field_validator("method", mode="before")
    @classmethod
    def _validate_method(cls, value: Any) -> Any:
        if value not in SCALING_METHODS:
            raise ValueError(
                f"invalid RoPE scaling method {value!r}; use one of: {', '.join(SCALING_METHODS)}"
            )
        return value

    @model_validator(mode="after")
    def _validate_factor(self) -> RopeScaling:
        if not math.isfinite(self.factor) or self.factor < 1:
            raise ValueError(
                f"invalid RoPE scaling factor {self.factor}; the factor is the ratio of the new context "
                "length to the trained one, so use a finite number >= 1"
            )
        if self.method != "none" and self.factor == 1:
            raise ValueError(
                f"RoPE scaling method {self.method!r} needs a factor > 1, but received factor 1; "
                "pass the context extension you want (e.g. 4), or use method 'none'"
            )
        if self.method == "none" and self.factor != 1:
            raise ValueError(
                f"RoPE scaling factor {self.factor} has no effect with method 'none'; "
                f"choose a method ({', '.join(SCALING_METHODS[1:])}) or leave the factor at 1"
            )
        return self


def apply_rope_scaling(config: PretrainedConfig, scaling: RopeScaling) -> PretrainedConfig:
    """Rewrite `config` in place for `scaling`, before any weights load, and return it.

    Keeps rope_theta, partial_rotary_factor and every other key already in rope_parameters.
    pi, ntk and yarn set max_position_embeddings to floor(trained length * F) and record the
    trained length as `config.original_max_position_embeddings`, the attribute that transformers'
    RoPE standardization reads (yarn also needs it inside rope_parameters). Method "none" leaves
    the config unchanged. Raises ValueError when the config has no rotary parameters, has one
    set per layer type, or already uses a RoPE scaling.
    """
    if scaling.method == "none":
        return config

    parameters = flat_rope_parameters(config)
    trained_length = unscaled_trained_length(config, parameters, scaling)
    factor = float(scaling.factor)

    if scaling.method == "ntk":
        dim = rotary_dim(config, parameters)
        parameters["rope_theta"] = ntk_base(parameters["rope_theta"], factor, dim)
    else:
        parameters["rope_type"] = ROPE_TYPES[scaling.method]
        parameters["factor"] = factor
    if scaling.method == "yarn":
        # transformers' YaRN validation requires this key. Its standardization later copies the
        # top-level original_max_position_embeddings set below over it, and the two are equal.
        parameters["original_max_position_embeddings"] = trained_length

    # Dynamic NTK reads max_position_embeddings as the trained length at run time, so it stays.
    if scaling.method != "dynamic-ntk":
        # NOTE: floor() makes the extended length an integer. When trained length * F is not
        # one, transformers' YaRN check logs a warning that the two lengths imply another factor.
        config.max_position_embeddings = math.floor(trained_length * factor)
        config.original_max_position_embeddings = trained_length
    config.validate_rope()

    logger.info(
        "RoPE scaling %s x%g on %s: rope_parameters %s, max_position_embeddings %d -> %d",
        scaling.method, factor, config.model_type, parameters, trained_length, config.max_position_embeddings,
    )
    return config


def max_cache_positions(config: PretrainedConfig) -> int:
    """Return the number of positions that the (possibly scaled) model behind `config` supports.

    This is max_position_embeddings, with two exceptions. For rope_type "longrope" it is the
    original length, because past it transformers switches every frequency to the long factors
    and keys cached before the switch would no longer match. Dynamic NTK already uses
    max_position_embeddings as its unscaled trained length, inside which it is inert. With
    per-layer-type parameters the smallest value of all layer types applies.
    """
    parameters = getattr(config, "rope_parameters", None)
    if not parameters:
        raise ValueError(
            f"model type {config.model_type!r} has no rope_parameters, so it has no RoPE position range; "
            "ctxmem needs a model with rotary position embeddings"
        )

    layer_types = config.nested_rope_parameter_keys(parameters)
    per_layer_type = [parameters[key] for key in layer_types if parameters[key]] or [parameters]
    limits = []
    for layer_parameters in per_layer_type:
        if layer_parameters.get("rope_type") == "longrope":
            limits.append(int(layer_parameters["original_max_position_embeddings"]))
        else:
            limits.append(int(config.max_position_embeddings))
    return min(limits)


def flat_rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """Return the config's single rope_parameters dict; raise ValueError if absent or per layer type."""
    model_type = getattr(config, "model_type", "unknown")
    parameters = getattr(config, "rope_parameters", None)
    if not parameters:
        raise ValueError(
            f"model type {model_type!r} has no rope_parameters, so RoPE scaling cannot apply; "
            "use a model with rotary position embeddings, or method 'none'"
        )
    layer_types = config.nested_rope_parameter_keys(parameters)
    if layer_types:
        raise ValueError(
            f"model type {model_type!r} sets rope_parameters per layer type ({', '.join(layer_types)}); "
            "ctxmem's RoPE scaling presets support a single set of parameters, so use method 'none'"
        )
    return parameters


def unscaled_trained_length(
    config: PretrainedConfig, parameters: dict[str, Any], scaling: RopeScaling
) -> int:
    """Return the trained context length; raise ValueError if the config already scales RoPE.

    A scaling that ships with the model (e.g. YaRN or Llama 3's) has a rope_type other than
    "default". The static NTK preset keeps "default", so a config that records an
    original_max_position_embeddings below max_position_embeddings counts as scaled too.
    """
    model_type = config.model_type
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"model type {model_type!r} already uses RoPE scaling rope_type {rope_type!r} "
            f"(factor {parameters.get('factor')}), so RoPE scaling method {scaling.method!r} cannot "
            "be added on top; keep the model's own scaling (--rope none), or start from the unscaled model"
        )

    trained_length = int(config.max_position_embeddings)
    original = getattr(config, "original_max_position_embeddings", None)
    if original is not None and int(original) < trained_length:
        raise ValueError(
            f"model type {model_type!r} is already extended from original_max_position_embeddings "
            f"{original} to max_position_embeddings {trained_length}, so RoPE scaling method "
            f"{scaling.method!r} would compound it; keep its scaling (--rope none), or start from the unscaled model"
        )
    return trained_length


def rotary_dim(config: PretrainedConfig, parameters: dict[str, Any]) -> int:
    """Return the number of rotated dimensions per head: head_dim * partial_rotary_factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * parameters.get("partial_rotary_factor", 1.0))


def ntk_base(base: float, factor: float, dim: int) -> float:
    """Return the static NTK-aware RoPE base, base * factor ** (dim / (dim - 2)).

    With this base the lowest frequency turns `factor` times slower while the highest one keeps
    its speed, so long-range positions are interpolated and short-range ones are not.
    """
    if dim <= 2:
        raise ValueError(
            f"NTK RoPE scaling needs a rotary dimension above 2, but the model rotates {dim}; "
            "use method 'pi' or 'yarn' for this model"
        )
    return base * factor ** (dim / (dim - 2))
