"""The model and memory manager that ChatCtxMem instances share within a process.

LangChain builds many chat-model objects with the same settings (`bind`, `bind_tools`,
`with_config` copy them). Each copy must not load the weights again, and all copies must share
one `MemoryManager`, so that a session held on the device serves every copy. One lock per
model runs one turn at a time: the model computes on one device, and a manager's LRU is not
thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.manager import MemoryManager
from ctxmem.model import load_model
from ctxmem.session import SessionSettings

from langchain_ctxmem.messages import TemplateRules

logger = logging.getLogger(__name__)

_models: dict[tuple[str, str, str], tuple[PreTrainedModel, PreTrainedTokenizerBase, threading.RLock]] = {}
_backends: dict[str, Backend] = {}
_registry_lock = threading.Lock()


@dataclass
class Backend:
    """One model, its tokenizer's template rules, one memory manager, and the lock of its turns."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    manager: MemoryManager
    rules: TemplateRules
    lock: threading.RLock  # shared by every backend of the model


def backend_for(model: str, device: str, dtype: str, redis_url: str | None, prefix: str,
                settings: SessionSettings | None, max_sessions: int, ttl_seconds: int | None,
                lock_timeout: float) -> Backend:
    """Return the process's backend for these settings, loading the model on first use."""
    key = json.dumps([model, device, dtype, redis_url, prefix, settings.model_dump() if settings else None,
                      max_sessions, ttl_seconds, lock_timeout])
    with _registry_lock:
        if key not in _backends:
            loaded, tokenizer, lock = _model(model, device, dtype)
            manager = MemoryManager(loaded, tokenizer, redis_url, prefix=prefix, settings=settings,
                                    max_sessions=max_sessions, ttl_seconds=ttl_seconds, lock_timeout=lock_timeout)
            _backends[key] = Backend(loaded, tokenizer, manager, TemplateRules.probe(tokenizer), lock)
        return _backends[key]


def _model(name: str, device: str, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, threading.RLock]:
    key = (name, device, dtype)
    if key not in _models:
        logger.info("loading model %r on %s (%s)", name, device, dtype)
        _models[key] = (*load_model(name, device=device, dtype=dtype), threading.RLock())
    return _models[key]
