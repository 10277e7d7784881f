"""Stored records of landmarks and chunks: pydantic models, their blobs, and their checks.

A landmark is one evicted chunk compressed to k entries per layer and KV head: its keys
(without RoPE) and values, shape [layers, kv_heads, k, head_dim], with k = 1 for the mean. A
chunk record keeps the chunk's full keys and values, [layers, kv_heads, chunk_len, head_dim],
for policies that retrieve whole chunks. Each record carries the fingerprint of the model that
computed it and a SHA-256 checksum of its tensor bytes.

Blob layout (msgpack, see `ctxmem.store.codec`): a map
`{"record": <record JSON>, "keys": <tensor>, "values": <tensor>}`, plus `"token_ids"` (a tensor
[chunk_len] or nil) for chunks. The tensors sit beside the record, not inside its JSON.

Every check of stored data raises `LandmarkMismatchError`, whose message names the session,
the index and what differs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError
from pydantic import field_validator, model_validator

from ctxmem.store import codec
from ctxmem.store.keys import validate_session_id

SCHEMA_VERSION = 1
FloatDtype = Literal["float32", "float16", "bfloat16"]
HEX_HASH = r"^[0-9a-f]{16,64}$"
SHA256_HEX = r"^[0-9a-f]{64}$"


class LandmarkMismatchError(ValueError):
    """Stored data that fails a check: checksum, schema version, shapes, or model fingerprint."""

    def __init__(self, session_id: str, index: int, problem: str, kind: str = "landmark"):
        super().__init__(f"session {session_id!r} {kind} {index}: {problem}")
        self.session_id = session_id
        self.index = index
        self.problem = problem


class ModelFingerprint(BaseModel):
    """Identity of the model that computed a record: architecture, config and weight hashes, shapes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str = Field(min_length=1)  # class name, e.g. "LlamaForCausalLM"
    model_type: str = Field(min_length=1)  # config.model_type, e.g. "llama"
    config_hash: str = Field(pattern=HEX_HASH)  # SHA-256 hex of the sorted config JSON
    weights_hash: str = Field(pattern=HEX_HASH)  # SHA-256 hex of the state dict
    layers: PositiveInt
    kv_heads: PositiveInt
    head_dim: PositiveInt
    dtype: FloatDtype


def fingerprint_differences(stored: ModelFingerprint, current: ModelFingerprint) -> list[str]:
    """Return one "field: stored X, model Y" line per field where the fingerprints differ."""
    return [
        f"{field}: stored {getattr(stored, field)!r}, model {getattr(current, field)!r}"
        for field in ModelFingerprint.model_fields
        if getattr(stored, field) != getattr(current, field)
    ]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class StoredRecord(BaseModel):
    """Fields shared by landmark and chunk records: where the tokens were, which model, the checksum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    session_id: str
    index: NonNegativeInt
    token_start: NonNegativeInt  # first token of the chunk in the stream
    token_end: PositiveInt  # one past the last token
    created: datetime = Field(default_factory=utc_now)
    fingerprint: ModelFingerprint
    layers: PositiveInt
    kv_heads: PositiveInt
    head_dim: PositiveInt
    dtype: FloatDtype
    checksum: str = Field(pattern=SHA256_HEX)  # SHA-256 hex of the tensor bytes, see `tensor_checksum`

    @field_validator("session_id")
    @classmethod
    def _valid_session_id(cls, session_id: str) -> str:
        return validate_session_id(session_id)

    @field_validator("created")
    @classmethod
    def _utc(cls, created: datetime) -> datetime:
        if created.tzinfo is None:
            raise ValueError("created must be timezone-aware, for example datetime.now(timezone.utc)")
        return created.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> StoredRecord:
        if self.token_start >= self.token_end:
            raise ValueError(f"token_start ({self.token_start}) must be less than "
                             f"token_end ({self.token_end})")
        for field in ("layers", "kv_heads", "head_dim"):
            if getattr(self, field) != getattr(self.fingerprint, field):
                raise ValueError(f"{field} is {getattr(self, field)}, but the fingerprint's model has "
                                 f"{getattr(self.fingerprint, field)}")
        return self

    def entries(self) -> int:
        """Return the number of entries per layer and KV head in the record's tensors."""
        raise NotImplementedError

    def tensor_shape(self) -> tuple[int, int, int, int]:
        """Return the shape of the keys and of the values: [layers, kv_heads, entries, head_dim]."""
        return (self.layers, self.kv_heads, self.entries(), self.head_dim)


class LandmarkRecord(StoredRecord):
    """A landmark: the source text of its chunk, how it was compressed, and usage counters."""

    text: str  # source text of the chunk
    compression: str = Field(default="mean", pattern=r"^(mean|centroids:[1-9][0-9]*)$")
    centroids: PositiveInt = 1  # k: entries per layer and KV head
    # NOTE: kept at 0; the counts live in the session's usage hash (ctxmem.store.usage), so
    # that a landmark's blob never changes once written.
    injected: NonNegativeInt = 0
    attention_mass: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _compression_matches_k(self) -> LandmarkRecord:
        expected = 1 if self.compression == "mean" else int(self.compression.split(":")[1])
        if self.centroids != expected:
            raise ValueError(f"compression {self.compression!r} needs centroids={expected}, "
                             f"got {self.centroids}")
        return self

    def entries(self) -> int:
        return self.centroids


class ChunkRecord(StoredRecord):
    """A chunk's full keys and values: one entry per token of [token_start, token_end)."""

    has_token_ids: bool = False

    def entries(self) -> int:
        return self.token_end - self.token_start


def tensor_checksum(*tensors: torch.Tensor | None) -> str:
    """Return the SHA-256 hex digest of the raw bytes of `tensors`, in order, skipping None."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is not None:
            digest.update(codec.tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_fields(
    keys: torch.Tensor, fingerprint: ModelFingerprint
) -> dict[str, int | str]:
    """Return the record fields read off `keys` [layers, kv_heads, n, head_dim]: shapes and dtype."""
    if keys.dim() != 4:
        raise ValueError(f"keys must have shape [layers, kv_heads, n, head_dim], got {list(keys.shape)}")
    layers, kv_heads, _, head_dim = keys.shape
    dtype = codec.dtype_name(keys.dtype)
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype,
            "fingerprint": fingerprint}


class Landmark(BaseModel):
    """A landmark record with its keys and values [layers, kv_heads, k, head_dim], keys without RoPE.

    One layer's entries go to `StreamingCache.place_landmarks` as `keys[layer][None]`, shape
    [1, kv_heads, k, head_dim].
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    record: LandmarkRecord
    keys: torch.Tensor  # [layers, kv_heads, k, head_dim], un-rotated
    values: torch.Tensor  # [layers, kv_heads, k, head_dim]

    @classmethod
    def from_tensors(
        cls,
        *,
        session_id: str,
        index: int,
        token_start: int,
        token_end: int,
        text: str,
        fingerprint: ModelFingerprint,
        keys: torch.Tensor,
        values: torch.Tensor,
        compression: str = "mean",
    ) -> Landmark:
        """Build a landmark whose record takes its shapes, dtype and checksum from the tensors."""
        record = LandmarkRecord(
            session_id=session_id, index=index, token_start=token_start, token_end=token_end,
            text=text, compression=compression, centroids=keys.shape[2] if keys.dim() == 4 else 0,
            checksum=tensor_checksum(keys, values), **tensor_fields(keys, fingerprint),
        )
        return cls(record=record, keys=keys, values=values)

    def checksum(self) -> str:
        return tensor_checksum(self.keys, self.values)

    def to_blob(self) -> bytes:
        return codec.encode({"record": self.record.model_dump_json(), "keys": self.keys,
                             "values": self.values})

    @classmethod
    def from_blob(cls, blob: bytes, session_id: str, index: int) -> Landmark:
        """Decode and verify a landmark read from the key of (`session_id`, `index`)."""
        fields = decode_fields(blob, session_id, index, "landmark", ("record", "keys", "values"))
        record = parse_record(LandmarkRecord, fields["record"], session_id, index, "landmark")
        landmark = cls(record=record, keys=fields["keys"], values=fields["values"])
        verify(landmark)
        return landmark


class Chunk(BaseModel):
    """A chunk record with its full keys and values [layers, kv_heads, chunk_len, head_dim]."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    record: ChunkRecord
    keys: torch.Tensor  # [layers, kv_heads, chunk_len, head_dim], un-rotated
    values: torch.Tensor  # [layers, kv_heads, chunk_len, head_dim]
    token_ids: torch.Tensor | None = None  # [chunk_len], int64

    @classmethod
    def from_tensors(
        cls,
        *,
        session_id: str,
        index: int,
        token_start: int,
        fingerprint: ModelFingerprint,
        keys: torch.Tensor,
        values: torch.Tensor,
        token_ids: torch.Tensor | None = None,
    ) -> Chunk:
        """Build a chunk covering [token_start, token_start + chunk_len), chunk_len read off `keys`."""
        record = ChunkRecord(
            session_id=session_id, index=index, token_start=token_start,
            token_end=token_start + (keys.shape[2] if keys.dim() == 4 else 0),
            has_token_ids=token_ids is not None,
            checksum=tensor_checksum(keys, values, token_ids), **tensor_fields(keys, fingerprint),
        )
        return cls(record=record, keys=keys, values=values, token_ids=token_ids)

    def checksum(self) -> str:
        return tensor_checksum(self.keys, self.values, self.token_ids)

    def to_blob(self) -> bytes:
        return codec.encode({"record": self.record.model_dump_json(), "keys": self.keys,
                             "values": self.values, "token_ids": self.token_ids})

    @classmethod
    def from_blob(cls, blob: bytes, session_id: str, index: int) -> Chunk:
        """Decode and verify a chunk read from the key of (`session_id`, `index`)."""
        fields = decode_fields(blob, session_id, index, "chunk", ("record", "keys", "values", "token_ids"))
        record = parse_record(ChunkRecord, fields["record"], session_id, index, "chunk")
        chunk = cls(record=record, keys=fields["keys"], values=fields["values"],
                    token_ids=fields["token_ids"])
        verify(chunk)
        return chunk


def decode_fields(blob: bytes, session_id: str, index: int, kind: str, names: tuple[str, ...]) -> dict:
    """Return the map in `blob` after checking that its fields are `names`, each tensor a tensor."""
    try:
        fields = codec.decode(blob)
    except ValueError as error:
        raise LandmarkMismatchError(session_id, index, f"invalid blob: {error}", kind) from error
    if not isinstance(fields, dict) or set(fields) != set(names):
        found = sorted(map(str, fields)) if isinstance(fields, dict) else type(fields).__name__
        raise LandmarkMismatchError(session_id, index, f"invalid blob: expected the fields "
                                    f"{', '.join(names)}, found {found}", kind)
    for name in names:
        value = fields[name]
        optional = name == "token_ids" and value is None
        if name != "record" and not optional and not isinstance(value, torch.Tensor):
            raise LandmarkMismatchError(session_id, index, f"invalid blob: {name} must be a tensor, "
                                        f"got {type(value).__name__}", kind)
    return fields


def parse_record(
    model: type[StoredRecord], record_json: object, session_id: str, index: int, kind: str
) -> StoredRecord:
    """Validate the record JSON of a blob read from the key of (`session_id`, `index`).

    The schema version is checked before anything else, so a record from another ctxmem version
    is reported as such rather than as a list of field errors.
    """
    def mismatch(problem: str) -> LandmarkMismatchError:
        return LandmarkMismatchError(session_id, index, problem, kind)

    try:
        data = json.loads(record_json) if isinstance(record_json, (str, bytes)) else None
    except ValueError as error:
        raise mismatch(f"invalid record JSON: {error}") from error
    if not isinstance(data, dict):
        raise mismatch("invalid record: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise mismatch(f"schema version {version!r}, but this ctxmem reads version {SCHEMA_VERSION}; "
                       "recompute the landmarks or use the ctxmem version that wrote them")
    try:
        record = model.model_validate(data)
    except ValidationError as error:
        raise mismatch(f"invalid record: {error}") from error
    if (record.session_id, record.index) != (session_id, index):
        raise mismatch(f"the blob contains session {record.session_id!r} {kind} {record.index}, "
                       "so it is stored under the wrong key")
    return record


def verify(item: Landmark | Chunk) -> None:
    """Check the tensors of `item` against its record: shapes, dtype and checksum."""
    record = item.record
    kind = "landmark" if isinstance(item, Landmark) else "chunk"

    def mismatch(problem: str) -> LandmarkMismatchError:
        return LandmarkMismatchError(record.session_id, record.index, problem, kind)

    expected = list(record.tensor_shape())
    for name in ("keys", "values"):
        tensor = getattr(item, name)
        if list(tensor.shape) != expected:
            raise mismatch(f"{name} shape {list(tensor.shape)} does not match the record's "
                           f"[layers, kv_heads, entries, head_dim] = {expected}")
        if codec.DTYPE_NAMES.get(tensor.dtype) != record.dtype:
            raise mismatch(f"{name} dtype {tensor.dtype} does not match the record's {record.dtype}")
    if isinstance(item, Chunk):
        verify_token_ids(item, mismatch)

    computed = item.checksum()
    if computed != record.checksum:
        raise mismatch(f"checksum mismatch (stored {record.checksum[:16]}..., computed "
                       f"{computed[:16]}...): the tensors were changed or corrupted")


def verify_token_ids(chunk: Chunk, mismatch: Callable[[str], LandmarkMismatchError]) -> None:
    """Check that token ids are present exactly when has_token_ids is set, as int64 [chunk_len]."""
    record, token_ids = chunk.record, chunk.token_ids
    if (token_ids is not None) != record.has_token_ids:
        raise mismatch(f"has_token_ids is {record.has_token_ids}, but token_ids is "
                       f"{'present' if token_ids is not None else 'missing'}")
    if token_ids is None:
        return
    if token_ids.dtype != torch.int64 or list(token_ids.shape) != [record.entries()]:
        raise mismatch(f"token_ids must be int64 of shape [{record.entries()}], got "
                       f"{token_ids.dtype} {list(token_ids.shape)}")


def check_compatible(record: StoredRecord, fingerprint: ModelFingerprint) -> None:
    """Raise LandmarkMismatchError naming each fingerprint field where `record` and the model differ."""
    differences = fingerprint_differences(record.fingerprint, fingerprint)
    if differences:
        kind = "landmark" if isinstance(record, LandmarkRecord) else "chunk"
        raise LandmarkMismatchError(
            record.session_id, record.index,
            f"computed by another model ({'; '.join(differences)}); recompute it with this model "
            "or load the model that computed it", kind,
        )
