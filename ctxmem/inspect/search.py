"""Search a session's landmarks by how well their keys match the model's encoding of a text."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctxmem.fingerprint import model_fingerprint
from ctxmem.inspect.inspector import Inspector, preview
from ctxmem.landmarks.builder import encode_chunk
from ctxmem.rope import rotary_spec
from ctxmem.store.records import check_compatible


@torch.no_grad()
def search_keys(inspector: Inspector, session_id: str, text: str, model: PreTrainedModel,
                tokenizer: PreTrainedTokenizerBase, limit: int = 10) -> list[dict]:
    """Return the `limit` landmarks whose keys best match `text`, best first.

    The text is encoded after BOS as a landmark's chunk is (`encode_chunk`, keys without RoPE),
    and its mean key per layer and KV head is compared with each landmark's mean key by cosine
    similarity, averaged over layers and KV heads. Each hit is {"index", "token_start",
    "token_end", "preview", "score"}. Raises LandmarkMismatchError when another model computed
    the session's landmarks.

    NOTE: the landmarks were encoded after the session's own sinks, not after BOS alone, so the
    scores rank landmarks but are not comparable across sessions.
    """
    session_id = inspector.require_session(session_id)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the search text is empty; pass the words to look for")
    sinks = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    keys, _ = encode_chunk(model, rotary_spec(model), sinks, ids)  # [layers, kv_heads, n, head_dim]
    query = torch.nn.functional.normalize(keys.float().mean(dim=2).cpu(), dim=-1)  # [layers, kv_heads, head_dim]
    fingerprint = model_fingerprint(model)

    hits = []
    for landmark in inspector.iter_landmarks(session_id):
        check_compatible(landmark.record, fingerprint)
        mean_key = torch.nn.functional.normalize(landmark.keys.float().mean(dim=2), dim=-1)  # [layers, kv_heads, head_dim]
        score = float((mean_key * query).sum(dim=-1).mean())
        record = landmark.record
        hits.append({"index": record.index, "token_start": record.token_start, "token_end": record.token_end,
                     "preview": preview(record.text), "score": score})
    hits.sort(key=lambda hit: hit["score"], reverse=True)
    return hits[:limit]
