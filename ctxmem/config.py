"""Validated settings of the bounded cache, shared by the library, the CLI and the adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SYSTEM_SINKS = "system"
PERPLEXITY_METHODS = ("dense", "window", "streaming", "recompute", "landmarks")  # see ctxmem.eval.perplexity
PASS_KEY_METHODS = ("dense", "streaming", "landmarks")  # see ctxmem.eval.passkey


class CacheConfig(BaseModel):
    """The split of a session's KV budget into sinks, landmark slots and the sliding window.

    The layout is [sinks | landmark slots | retrieval region | window], and the budget is their sum.
    `sinks` is a number of leading tokens kept forever (StreamingLLM's attention sinks) or
    "system" to pin the whole leading system message, so an agent's instructions are never
    evicted. `window` None takes whatever the model's position range leaves after the sinks
    and landmark slots. Eviction removes `chunk` tokens at a time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sinks: int | Literal["system"] = Field(default=4, description="leading tokens kept forever, or 'system'")
    window: int | None = Field(default=None, ge=1, description="recent tokens kept; None fills the position range")
    chunk: int = Field(default=64, ge=1, description="tokens evicted at a time; also the prefill piece size")
    landmark_slots: int = Field(default=0, ge=0, description="cache entries reserved for landmarks")
    retrieval_slots: int = Field(default=0, ge=0, description="cache entries for chunks restored by `retrieve`")

    @model_validator(mode="after")
    def _check(self) -> "CacheConfig":
        if isinstance(self.sinks, int) and self.sinks < 0:
            raise ValueError(f"sinks must be >= 0 or 'system', got {self.sinks}")
        if self.window is not None and self.chunk > self.window:
            raise ValueError(f"chunk ({self.chunk}) is larger than the window ({self.window}); "
                             "use a chunk of at most the window size")
        return self

    def window_for(self, pinned: int, max_positions: int) -> int:
        """Return the window size for `pinned` pinned tokens in a model of `max_positions` positions.

        Raises ValueError when the cache would need positions beyond the model's range.
        """
        reserved = pinned + self.landmark_slots + self.retrieval_slots
        if self.window is None and reserved >= max_positions:
            raise ValueError(
                f"{pinned} pinned tokens, {self.landmark_slots} landmark slots and {self.retrieval_slots} retrieval "
                f"slots leave no room for a window in "
                f"the model's {max_positions} positions; shorten the system message, use fewer sinks or slots, "
                "or extend the positions with a RoPE scaling preset (--rope, --rope-factor)"
            )
        window = self.window if self.window is not None else max_positions - reserved
        if window < self.chunk:
            raise ValueError(f"chunk {self.chunk} is larger than the window of {window} tokens; lower the chunk size, "
                             "or leave the window more room with fewer sinks, landmark or retrieval slots")
        capacity = reserved + window
        if capacity > max_positions:
            raise ValueError(
                f"cache of {pinned} pinned + {self.landmark_slots} landmark slots + {self.retrieval_slots} retrieval "
                f"slots + window {window} = {capacity} "
                f"entries does not fit the model's {max_positions} positions; use a smaller window or fewer "
                "sinks, or extend the positions with a RoPE scaling preset or a larger factor (--rope, --rope-factor)"
            )
        return window


class LandmarkConfig(BaseModel):
    """Settings that turn evicted chunks into landmarks and choose which fill the landmark slots.

    `source` "recompute" encodes each chunk afresh over [sinks + chunk] at positions 0..;
    "window" takes the chunk's keys and values from the window as it is evicted (cheaper, for
    comparison). `centroids` entries per landmark (1: the mean key and value).

    `policy` picks what fills the slots (see ctxmem.landmarks.policies): the newest landmarks,
    the ones whose keys best match the last `query_tokens` queries, or, with `retrieve`, the
    `retrieve` best-matching chunks restored whole into the retrieval region. `bias` adds
    log(tokens per entry) to the attention logits of landmark entries.

    `attention_stats` counts, per landmark, how often it was placed in the cache and the
    attention mass its entries received, and writes the counts to the store's usage hash
    (see ctxmem.store.usage). Off by default, because it computes the attention a second time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["recent", "relevant", "retrieve"] = "recent"
    centroids: int = Field(default=1, ge=1)
    source: Literal["recompute", "window"] = "recompute"
    retrieve: int = Field(default=0, ge=0, description="chunks restored whole by the retrieve policy")
    # NOTE: 1 scored best on the reference model's pass keys at 2,048 tokens with 6 chunks of 16
    # (0.97, against 0.93 for 4 and 0.90 for 16, over 30 trials). It was not tuned on any other model.
    query_tokens: int = Field(default=1, ge=1, description="latest queries that score landmarks")
    bias: bool = Field(default=False, description="add log(tokens per entry) to landmark attention logits")
    attention_stats: bool = Field(default=False, description="record injections and attention mass per landmark")

    @model_validator(mode="after")
    def _check(self) -> "LandmarkConfig":
        if self.policy == "retrieve" and self.retrieve < 1:
            raise ValueError("the retrieve policy needs retrieve >= 1 (chunks restored whole); pass --retrieve K")
        if self.policy != "retrieve" and self.retrieve:
            raise ValueError(f"retrieve={self.retrieve} needs the retrieve policy; pass --landmark-policy retrieve")
        return self

    @property
    def uses_queries(self) -> bool:
        return self.policy != "recent"
