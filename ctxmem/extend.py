"""Context extension: scale a model's RoPE, fine-tune it on long chunks, and write a model folder.

Position Interpolation (PI, arXiv 2306.15595) and YaRN (arXiv 2309.00071) change the rotary
frequencies so that F times more positions map into the angle range the model was trained on.
A short fine-tuning run on sequences of the extended length then adapts the weights.
Static and dynamic NTK-aware scaling are training-free: for them `extend` only writes the
rescaled config next to the unchanged weights.

The written folder is an ordinary transformers checkpoint: the config carries the new
`rope_parameters` and `max_position_embeddings`, so ctxmem's `load_model` and plain
`AutoModelForCausalLM.from_pretrained` load the same model. Everything is validated before
any weight loads, and the folder appears only once it is complete: it is written to a hidden
folder next to the output and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.model import DTYPES, check_supported, load_model, resolve_device, resolve_source
from ctxmem.rope_scaling import RopeScaling, apply_rope_scaling, max_cache_positions

logger = logging.getLogger(__name__)

EXTEND_METHODS = ("pi", "yarn", "ntk", "dynamic-ntk")
TRAINING_FREE_METHODS = ("ntk", "dynamic-ntk")
RECORD_FILE = "extension.json"

StepCallback = Callable[[int, float], None]  # called with (step, loss) after each optimizer step, step from 1


class ExtendSettings(BaseModel):
    """Settings of an extension: the RoPE scaling, and the fine-tuning run that adapts the weights to it.

    `context` is the length of each training sequence (None: the extended length, trained
    length x factor). The learning rate rises linearly over `warmup_steps` and then stays
    constant, so a run of N steps equals the first N steps of a longer run with the same seed.
    `gradient_checkpointing` None turns it on exactly when training on CUDA.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    factor: float
    steps: int = 0
    lr: float = 1e-4
    context: int | None = None
    batch_size: int = 4
    seed: int = 0
    warmup_steps: int = 20
    gradient_checkpointing: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> ExtendSettings:
        if self.method not in EXTEND_METHODS:
            raise ValueError(f"invalid method {self.method!r}; use one of: {', '.join(EXTEND_METHODS)}")
        if not math.isfinite(self.factor) or self.factor <= 1:
            raise ValueError(f"invalid factor {self.factor}; the factor is the new context length over the trained "
                             "one, so pass a number above 1, such as 4")
        if self.steps < 0:
            raise ValueError(f"invalid steps {self.steps}; use 0 (write the scaled config only) or more")
        if self.steps > 0 and self.method in TRAINING_FREE_METHODS:
            raise ValueError(f"method {self.method!r} is training-free, so it takes steps 0, but received steps "
                             f"{self.steps}; pass steps 0, or fine-tune with method 'pi' or 'yarn'")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"invalid learning rate {self.lr}; use a positive number such as 1e-4")
        if self.context is not None and self.context < 2:
            raise ValueError(f"invalid context {self.context}; a training sequence needs at least 2 tokens")
        if self.batch_size < 1:
            raise ValueError(f"invalid batch size {self.batch_size}; use 1 or more sequences per step")
        if self.warmup_steps < 0:
            raise ValueError(f"invalid warmup steps {self.warmup_steps}; use 0 or more")
        return self

    @property
    def rope(self) -> RopeScaling:
        return RopeScaling(method=self.method, factor=self.factor)


class MemoryEstimate(BaseModel):
    """Estimated peak memory of a fine-tuning run, in bytes, before it starts.

    Parameters, gradients and the two AdamW moments are float32 (16 bytes per parameter).
    Activations are what autograd keeps per token for a Llama-style decoder layer, about
    10 x hidden + 2 x kv + 4 x intermediate values, plus the logits and their gradient.
    With gradient checkpointing only each layer's input is kept, and one layer is recomputed
    at a time.
    """

    parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass
class ExtendResult:
    """The folder that `ExtensionJob.run` wrote, with its settings and measurements."""

    out: Path
    settings: ExtendSettings
    context: int
    tokens_seen: int
    losses: list[float]
    seconds: float
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    positions: int  # positions the written model supports in ctxmem's cache (max_cache_positions)
    memory: MemoryEstimate
    measured_peak_bytes: int | None = None  # CUDA only: torch.cuda.max_memory_allocated during training

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), **self.settings.model_dump(), "context": self.context,
            "tokens_seen": self.tokens_seen, "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None, "seconds": round(self.seconds, 1),
            "rope_parameters": self.rope_parameters, "max_position_embeddings": self.max_position_embeddings,
            "positions": self.positions,
            "memory_estimate": ({**self.memory.model_dump(), "total_bytes": self.memory.total_bytes}
                                if self.settings.steps else None),
            "measured_peak_bytes": self.measured_peak_bytes,
        }


@dataclass
class ExtensionJob:
    """A validated extension, ready to run: everything is checked and nothing heavy is loaded yet.

    Build it with `ExtensionJob.prepare`, read `memory` (the estimate), then call `run`.
    """

    source: str
    out: Path
    settings: ExtendSettings
    config: PretrainedConfig  # the scaled config
    tokenizer: PreTrainedTokenizerBase
    data: list[int]
    context: int
    device: torch.device
    overwrite: bool
    memory: MemoryEstimate
    checkpointing: bool
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def prepare(cls, model: str | os.PathLike, out: str | os.PathLike, settings: ExtendSettings,
                data: str | os.PathLike | Sequence[int] | None = None, device: str | torch.device = "auto",
                overwrite: bool = False) -> ExtensionJob:
        """Validate every input and return the job; raise ValueError or FileNotFoundError otherwise.

        `data` is a UTF-8 text file or token ids of `model`'s tokenizer (without BOS, which
        every training sequence gets in front). It is required when settings.steps > 0 and
        rejected when it is 0, since it would go unused.
        """
        source = resolve_source(model)
        out_path = check_output(out, overwrite, source)
        if settings.steps > 0 and data is None:
            raise ValueError(f"fine-tuning for {settings.steps} steps needs training text; pass --data PATH "
                             "(a UTF-8 text file), or steps 0 to write the scaled config only")
        if settings.steps == 0 and data is not None:
            raise ValueError("training text is unused with steps 0; drop --data, or pass --steps N to fine-tune")
        torch_device = resolve_device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} needs a CUDA GPU, but torch {torch.__version__} finds none; "
                             "pass --device cpu, or run on a machine with a GPU")

        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as error:
            reason = str(error).strip().rstrip(".")
            raise FileNotFoundError(f"cannot load the config of model {source!r}: {reason}; pass 'reference', "
                                    "a local model folder, or a hub id with network access") from error
        check_supported(config)
        trained_length = int(config.max_position_embeddings)
        apply_rope_scaling(config, settings.rope)
        context = settings.context or math.floor(trained_length * settings.factor)
        extended = math.floor(trained_length * settings.factor)
        if settings.steps > 0 and context > extended:
            raise ValueError(f"context {context} is longer than the extended length {extended} (trained length "
                             f"{trained_length} x factor {settings.factor:g}); use a context of at most {extended}")

        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = _data_ids(data, tokenizer) if data is not None else []
        if settings.steps > 0:
            _check_data_length(ids, context, tokenizer, data)
        checkpointing = settings.gradient_checkpointing
        if checkpointing is None:
            checkpointing = torch_device.type == "cuda"
        memory = estimate_memory(config, settings.batch_size, context, checkpointing,
                                 activation_bytes=2 if torch_device.type == "cuda" else 4)
        record = {"source": str(model), "data": str(data) if isinstance(data, (str, os.PathLike)) else "token ids",
                  "data_tokens": len(ids), "trained_length": trained_length}
        return cls(source=source, out=out_path, settings=settings, config=config, tokenizer=tokenizer, data=ids,
                   context=context, device=torch_device, overwrite=overwrite, memory=memory,
                   checkpointing=checkpointing, record=record)

    def run(self, on_step: StepCallback | None = None) -> ExtendResult:
        """Load the weights, fine-tune them (if steps > 0), and write the model folder."""
        started = time.perf_counter()
        model, _ = load_model(self.source, device=self.device, dtype="float32", rope=self.settings.rope)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        losses: list[float] = []
        if self.settings.steps > 0:
            losses = finetune(model, self.data, self.settings, self.context, bos_id=self.tokenizer.bos_token_id,
                              checkpointing=self.checkpointing, on_step=on_step)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        seconds = time.perf_counter() - started
        tokens_seen = self.settings.steps * self.settings.batch_size * self.context
        record = {**self.record, **self.settings.model_dump(), "context": self.context,
                  "tokens_seen": tokens_seen, "losses": [round(loss, 5) for loss in losses],
                  "seconds": round(seconds, 1)}
        save_model_folder(model, self.tokenizer, self.out, self.overwrite, record,
                          save_dtype=_stored_dtype(self.config))
        return ExtendResult(out=self.out, settings=self.settings, context=self.context, tokens_seen=tokens_seen,
                            losses=losses, seconds=seconds, rope_parameters=dict(model.config.rope_parameters),
                            max_position_embeddings=int(model.config.max_position_embeddings),
                            positions=max_cache_positions(model.config), memory=self.memory,
                            measured_peak_bytes=peak)


def extend(model: str | os.PathLike, out: str | os.PathLike, settings: ExtendSettings,
           data: str | os.PathLike | Sequence[int] | None = None, device: str | torch.device = "auto",
           overwrite: bool = False, on_step: StepCallback | None = None) -> ExtendResult:
    """Extend `model`'s context by `settings` and write the result to the folder `out`."""
    job = ExtensionJob.prepare(model, out, settings, data=data, device=device, overwrite=overwrite)
    return job.run(on_step=on_step)


def check_output(out: str | os.PathLike, overwrite: bool, source: str) -> Path:
    """Return `out` as a Path after checking that the model folder may be written there."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {str(out)!r} is a file; pass the path of a folder to create")
    if path.exists() and not overwrite:
        raise ValueError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it, "
                         "or choose another --out")
    if path.exists() and path.resolve() == Path(source).resolve():
        raise ValueError(f"output folder {str(out)!r} is the model being extended; choose another --out")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"parent folder {str(path.parent)!r} of the output does not exist; create it "
                                "first, or choose another --out")
    return path


def read_text_ids(path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokenize a UTF-8 text file without special tokens; raise ValueError if it has no text."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"data path {str(path)!r} is a folder; pass the path of a UTF-8 text file")
    if not file.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found; pass the path of a UTF-8 text file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 ({error.reason} at byte {error.start}); "
                         "convert it to UTF-8 first") from error
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"data file {str(path)!r} is empty (0 tokens); pass a text file with training text")
    return ids


def _data_ids(data: str | os.PathLike | Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if isinstance(data, (str, os.PathLike)):
        return read_text_ids(data, tokenizer)
    ids = [int(token) for token in data]
    if not ids:
        raise ValueError("the training token ids are empty; pass the ids of some training text")
    vocab = len(tokenizer)
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"training token ids must lie in [0, {vocab}), the tokenizer's vocabulary, but range "
                         f"from {min(ids)} to {max(ids)}; tokenize the text with the model's own tokenizer")
    return ids


def _check_data_length(ids: list[int], context: int, tokenizer: PreTrainedTokenizerBase, data: Any) -> None:
    """Raise ValueError when the training text is shorter than one training sequence."""
    needed = context - (1 if tokenizer.bos_token_id is not None else 0)
    if len(ids) < needed:
        where = f"data file {str(data)!r}" if isinstance(data, (str, os.PathLike)) else "the training token ids"
        raise ValueError(f"{where} has {len(ids)} tokens, fewer than one training sequence of context {context} "
                         f"needs ({needed}); pass more text, or a smaller --context")


def estimate_memory(config: PretrainedConfig, batch_size: int, context: int, checkpointing: bool,
                    activation_bytes: int) -> MemoryEstimate:
    """Estimate the peak memory of fine-tuning the model of `config` (see MemoryEstimate).

    Counts the parameters on the meta device, so no weight is allocated.
    NOTE: an estimate, within a factor of about 2. Eager attention keeps heads x context more
    values per token, and allocator overhead comes on top; `ExtendResult.measured_peak_bytes`
    gives the real CUDA peak after a run.
    """
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layers = config.num_hidden_layers
    tokens = batch_size * context

    per_layer = 10 * hidden + 2 * kv + 4 * intermediate  # values kept per token by one decoder layer
    if getattr(config, "_attn_implementation", None) == "eager":
        per_layer += 2 * heads * context  # attention scores and probabilities
    kept_layers = layers * hidden + per_layer if checkpointing else layers * per_layer
    activations = tokens * kept_layers * activation_bytes
    logits = tokens * config.vocab_size * 4 * 3  # float32 logits, log-softmax and their gradient
    return MemoryEstimate(parameters=parameters, parameter_bytes=4 * parameters, gradient_bytes=4 * parameters,
                          optimizer_bytes=8 * parameters, activation_bytes=activations + logits)


class ChunkSampler:
    """Draws training batches [batch, context] of random spans of `ids`, each led by BOS when there is one."""

    def __init__(self, ids: list[int], context: int, batch_size: int, bos_id: int | None, seed: int):
        self.ids = torch.tensor(ids, dtype=torch.long)  # [tokens]
        self.bos_id = bos_id
        self.span = context - (1 if bos_id is not None else 0)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self) -> torch.Tensor:
        starts = torch.randint(0, self.ids.numel() - self.span + 1, (self.batch_size,), generator=self.generator)
        rows = torch.stack([self.ids[start:start + self.span] for start in starts.tolist()])  # [batch, span]
        if self.bos_id is None:
            return rows
        bos = torch.full((self.batch_size, 1), self.bos_id, dtype=torch.long)
        return torch.cat((bos, rows), dim=1)  # [batch, context]


def learning_rate(step: int, settings: ExtendSettings) -> float:
    """Return the learning rate of optimizer step `step` (from 0): linear warmup, then constant."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    return settings.lr


def finetune(model: PreTrainedModel, ids: list[int], settings: ExtendSettings, context: int,
             bos_id: int | None, checkpointing: bool = False, on_step: StepCallback | None = None) -> list[float]:
    """Fine-tune `model` in place on random `context`-token spans of `ids`; return the loss of each step.

    AdamW (betas 0.9 and 0.95, no weight decay) with gradients clipped to norm 1. On CUDA the
    forward and backward run under bfloat16 autocast over float32 weights. `on_step` may put
    the model in eval mode (to measure it); each step sets train mode again.
    """
    device = model.device
    torch.manual_seed(settings.seed)
    sampler = ChunkSampler(ids, context, settings.batch_size, bos_id, settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if checkpointing:
        _set_checkpointing(model, True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    losses = []
    try:
        for step in range(settings.steps):
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            batch = sampler.batch().to(device)  # [batch, context]
            with autocast:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            logger.debug("step %d: loss %.4f", step + 1, losses[-1])
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        if checkpointing:
            _set_checkpointing(model, False)
        model.eval()
    return losses


def _set_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, under either transformers 5 name."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x, before v6
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, overwrite: bool,
                      record: dict[str, Any], save_dtype: torch.dtype = torch.float32) -> None:
    """Write weights, config, tokenizer (with its chat template) and `record` to the folder `out`.

    Everything goes to a hidden folder next to `out` first, which is renamed to `out` at the
    end, so a failure leaves no partial folder. With `overwrite`, an existing `out` is moved
    aside just before the rename and deleted after it.
    """
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    replaced = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    try:
        model.to(save_dtype).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            if not overwrite:  # another process created it while this one trained
                raise ValueError(f"output folder {str(out)!r} appeared during the run; pass --overwrite to "
                                 "replace it, or choose another --out")
            out.rename(replaced)
        try:
            partial.rename(out)
        except OSError:
            if replaced.exists():
                replaced.rename(out)  # put the old folder back
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
    logger.info("wrote %s", out)


def _stored_dtype(config: PretrainedConfig) -> torch.dtype:
    """Return the dtype the source checkpoint was stored in (float32 when its config has no dtype)."""
    stored = getattr(config, "dtype", None)
    if isinstance(stored, torch.dtype):
        return stored if stored in DTYPES.values() else torch.float32
    return DTYPES.get(str(stored), torch.float32)
