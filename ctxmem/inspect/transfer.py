"""Export a session to JSON Lines and import it back, byte for byte.

One JSON object per line, the first being the header:

    {"kind": "header", "format": "ctxmem-session", "version": 1, "session": ID,
     "fingerprint": {...} or null, "counts": {"landmarks", "chunks", "messages", "state", "usage"}}
    {"kind": "meta", "fields": {name: value}}                 the meta hash
    {"kind": "state", "version": V, "blob": B64}              the conversation's state, if any
    {"kind": "message", "position": P, "role": R, "blob": B64}
    {"kind": "landmark", "index": I, "record": {...}, "blob": B64}
    {"kind": "chunk", "index": I, "record": {...}, "blob": B64}
    {"kind": "usage", "fields": {name: value}}               the usage counters, if any

`blob` is the stored msgpack value in base64, tensors included, so an import stores exactly the
bytes that were exported. `record` repeats a landmark's or chunk's record for reading, and the
import rejects a line whose record differs from its blob's. The import checks the whole file
first (JSON, base64, decoding, checksums, one model fingerprint, the header's counts) and writes
nothing when any line fails, naming the line number.

NOTE: an export reads the keys one after another, so a writer that commits meanwhile may leave
it with a state from one turn and landmarks from another. Export an idle session.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Iterator

from ctxmem.inspect.inspector import Inspector
from ctxmem.store.codec import decode
from ctxmem.store.keys import validate_session_id
from ctxmem.store.records import (
    Chunk, Landmark, LandmarkMismatchError, ModelFingerprint, fingerprint_differences,
)
from ctxmem.store.sessions import STATE_SCHEMA_VERSION

logger = logging.getLogger(__name__)

FORMAT = "ctxmem-session"
FORMAT_VERSION = 1
ITEM_KINDS = ("landmark", "chunk")


class ImportFileError(ValueError):
    """A line of an export file is malformed or inconsistent; the message names the file and line."""


def export_session(inspector: Inspector, session_id: str, out: IO[str]) -> dict:
    """Write the session to `out` as JSON Lines; return the header's counts."""
    session_id = inspector.require_session(session_id)
    client, keys = inspector.client, inspector.keys
    meta = {name.decode(): value.decode() for name, value in client.hgetall(keys.meta(session_id)).items()}
    state_blob = client.get(keys.state(session_id))
    messages = client.lrange(keys.messages(session_id), 0, -1)
    items = {kind: list(_item_blobs(inspector, session_id, kind)) for kind in ITEM_KINDS}
    usage = {name.decode(): value.decode() for name, value in inspector.usage_store.read_raw(session_id).items()}
    fingerprint = json.loads(meta["fingerprint"]) if "fingerprint" in meta else None
    if fingerprint is None and state_blob is not None:
        fingerprint = decode(state_blob)["state"]["fingerprint"]

    counts = {"landmarks": len(items["landmark"]), "chunks": len(items["chunk"]), "messages": len(messages),
              "state": state_blob is not None, "usage": len(usage)}
    lines = [{"kind": "header", "format": FORMAT, "version": FORMAT_VERSION, "session": session_id,
              "fingerprint": fingerprint, "counts": counts},
             {"kind": "meta", "fields": meta}]
    if state_blob is not None:
        lines.append({"kind": "state", "version": decode(state_blob)["state"]["version"], "blob": _b64(state_blob)})
    for position, blob in enumerate(messages):
        lines.append({"kind": "message", "position": position, "role": decode(blob)["message"]["role"],
                      "blob": _b64(blob)})
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
    for kind in ITEM_KINDS:
        for item, blob in items[kind]:
            out.write(json.dumps({"kind": kind, "index": item.record.index,
                                  "record": item.record.model_dump(mode="json"), "blob": _b64(blob)},
                                 ensure_ascii=False) + "\n")
    if usage:
        out.write(json.dumps({"kind": "usage", "fields": usage}) + "\n")
    return counts


def _item_blobs(inspector: Inspector, session_id: str, kind: str) -> Iterator[tuple[Landmark | Chunk, bytes]]:
    """Yield each stored landmark or chunk of the session, verified, with its blob bytes."""
    client, keys = inspector.client, inspector.keys
    indices = [int(member) for member in client.zrange(keys.item_index(session_id, kind), 0, -1)]
    item_type = Landmark if kind == "landmark" else Chunk
    for start in range(0, len(indices), 500):
        page = indices[start:start + 500]
        for index, blob in zip(page, client.mget([keys.item(session_id, kind, index) for index in page])):
            if blob is not None:
                yield item_type.from_blob(blob, session_id, index), blob


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


@dataclass
class ExportFile:
    """A checked export file: everything an import writes."""

    session_id: str
    fingerprint: ModelFingerprint | None
    meta: dict[str, str] = field(default_factory=dict)
    state: bytes | None = None
    messages: list[bytes] = field(default_factory=list)
    items: dict[str, list[tuple[int, bytes]]] = field(default_factory=lambda: {kind: [] for kind in ITEM_KINDS})
    usage: dict[str, str] = field(default_factory=dict)


def read_export(path: str | Path) -> ExportFile:
    """Parse and check every line of an export file; raise ImportFileError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export file {str(path)!r} not found; pass the .jsonl file that "
                                "`ctxmem inspect export` wrote")
    export: ExportFile | None = None
    counts: dict = {}
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            where = f"line {number} of {str(path)!r}"
            line = _parse_line(text, where)
            if export is None:
                export, counts = _read_header(line, where)
                continue
            _read_line(export, line, where)
    if export is None:
        raise ImportFileError(f"{str(path)!r} is empty; pass a file that `ctxmem inspect export` wrote")
    _check_counts(export, counts, path)
    return export


def _parse_line(text: str, where: str) -> dict:
    try:
        line = json.loads(text)
    except ValueError as error:
        raise ImportFileError(f"{where} is not valid JSON ({error}); fix or remove the line") from None
    if not isinstance(line, dict) or not isinstance(line.get("kind"), str):
        raise ImportFileError(f"{where} is not a JSON object with a \"kind\"; fix or remove the line")
    return line


def _read_header(line: dict, where: str) -> tuple[ExportFile, dict]:
    if line["kind"] != "header" or line.get("format") != FORMAT:
        raise ImportFileError(f"{where} is not a ctxmem export header (kind {line['kind']!r}); "
                              "pass a file that `ctxmem inspect export` wrote")
    if line.get("version") != FORMAT_VERSION:
        raise ImportFileError(f"{where}: export format version {line.get('version')!r}, but this ctxmem "
                              f"reads version {FORMAT_VERSION}")
    try:
        fingerprint = None if line.get("fingerprint") is None else ModelFingerprint.model_validate(line["fingerprint"])
        export = ExportFile(session_id=validate_session_id(line["session"]), fingerprint=fingerprint)
        counts = dict(line["counts"])
    except (KeyError, TypeError, ValueError) as error:
        raise ImportFileError(f"{where}: invalid header ({error})") from None
    return export, counts


def _read_line(export: ExportFile, line: dict, where: str) -> None:
    """Check one line after the header and add its content to `export`."""
    kind = line["kind"]
    if kind in ("meta", "usage"):
        fields = line.get("fields")
        if not isinstance(fields, dict) or not all(isinstance(value, str) for value in fields.values()):
            raise ImportFileError(f"{where}: {kind} \"fields\" must be an object of strings")
        (_check_meta if kind == "meta" else _check_usage)(fields, export, where)
        setattr(export, kind, fields)
    elif kind == "state":
        export.state = _check_state(_blob(line, where), export, where)
    elif kind == "message":
        blob = _blob(line, where)
        if line.get("position") != len(export.messages):
            raise ImportFileError(f"{where}: message position {line.get('position')!r}, expected "
                                  f"{len(export.messages)}; messages must come in order")
        try:
            record = decode(blob)
        except ValueError as error:
            raise ImportFileError(f"{where}: invalid message blob ({error})") from None
        if not isinstance(record, dict):
            raise ImportFileError(f"{where}: invalid message blob: expected a map, got {type(record).__name__}")
        export.messages.append(blob)
    elif kind in ITEM_KINDS:
        export.items[kind].append(_check_item(kind, line, export, where))
    else:
        raise ImportFileError(f"{where}: unknown kind {kind!r}; expected meta, state, message, landmark, "
                              "chunk or usage")


def _check_meta(fields: dict[str, str], export: ExportFile, where: str) -> None:
    """Check the meta hash's fingerprint against the file's model and its times as numbers."""
    try:
        if "fingerprint" in fields:
            _check_same_model(export, ModelFingerprint.model_validate_json(fields["fingerprint"]), where, "the meta hash")
        for name in ("created", "updated"):
            if name in fields:
                _timestamp(fields[name])
    except ValueError as error:
        raise ImportFileError(f"{where}: invalid meta field ({str(error).splitlines()[0]}); the line was edited, "
                              "so export the session again") from None


def _timestamp(value: str) -> float:
    """Return Unix seconds from a meta time: seconds, or ISO 8601 as the session store writes it."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value).timestamp()


def _check_usage(fields: dict[str, str], export: ExportFile, where: str) -> None:
    """Check that every usage field is "<index>:injected" (an integer) or "<index>:mass" (a number >= 0)."""
    for name, value in fields.items():
        index, _, counter = name.partition(":")
        try:
            number = int(value) if counter == "injected" else float(value)
            valid = index.isdigit() and counter in ("injected", "mass") and number >= 0
        except ValueError:
            valid = False
        if not valid:
            raise ImportFileError(f"{where}: invalid usage field {name!r}: {value!r}; expected '<index>:injected' "
                                  "with an integer or '<index>:mass' with a number, so export the session again")


def _blob(line: dict, where: str) -> bytes:
    try:
        return base64.b64decode(line["blob"], validate=True)
    except (KeyError, TypeError, binascii.Error) as error:
        raise ImportFileError(f"{where}: missing or invalid base64 \"blob\" ({error})") from None


def _check_state(blob: bytes, export: ExportFile, where: str) -> bytes:
    try:
        wrapper = decode(blob)
        version, state = wrapper["schema_version"], wrapper["state"]
        stored = ModelFingerprint.model_validate(state["fingerprint"])
    except (ValueError, KeyError, TypeError) as error:
        raise ImportFileError(f"{where}: invalid state blob ({error})") from None
    if version != STATE_SCHEMA_VERSION:
        raise ImportFileError(f"{where}: state schema version {version!r}, but this ctxmem reads version "
                              f"{STATE_SCHEMA_VERSION}")
    _check_same_model(export, stored, where, "the state")
    return blob


def _check_item(kind: str, line: dict, export: ExportFile, where: str) -> tuple[int, bytes]:
    """Decode and verify a landmark or chunk line; return its index and blob."""
    index = line.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ImportFileError(f"{where}: invalid {kind} index {index!r}; expected an integer, 0 or more")
    blob = _blob(line, where)
    item_type = Landmark if kind == "landmark" else Chunk
    try:
        item = item_type.from_blob(blob, export.session_id, index)
    except LandmarkMismatchError as error:
        raise ImportFileError(f"{where}: {error}") from None
    if line.get("record") != item.record.model_dump(mode="json"):
        raise ImportFileError(f"{where}: the \"record\" of {kind} {index} differs from the record in its blob; "
                              "the line was edited, so export the session again")
    _check_same_model(export, item.record.fingerprint, where, f"{kind} {index}")
    return index, blob


def _check_same_model(export: ExportFile, fingerprint: ModelFingerprint, where: str, what: str) -> None:
    if export.fingerprint is None:
        export.fingerprint = fingerprint
        return
    differences = fingerprint_differences(export.fingerprint, fingerprint)
    if differences:
        raise ImportFileError(f"{where}: {what} was computed by another model than the rest of the file "
                              f"({'; '.join(differences)}); a session holds data of one model only")


def _check_counts(export: ExportFile, counts: dict, path: Path) -> None:
    found = {"landmarks": len(export.items["landmark"]), "chunks": len(export.items["chunk"]),
             "messages": len(export.messages), "state": export.state is not None, "usage": len(export.usage)}
    if found != counts:
        different = ", ".join(f"{name} {found[name]} (header: {counts.get(name)})" for name in found
                              if found[name] != counts.get(name))
        raise ImportFileError(f"{str(path)!r} does not hold what its header lists: {different}; the file is "
                              "truncated or was edited, so export the session again")


def check_model(export: ExportFile, fingerprint: ModelFingerprint) -> None:
    """Raise ImportFileError when the file's data was computed by another model than `fingerprint`."""
    if export.fingerprint is None:
        return
    differences = fingerprint_differences(export.fingerprint, fingerprint)
    if differences:
        raise ImportFileError(f"session {export.session_id!r} in the file was computed by another model "
                              f"({'; '.join(differences)}); import it without --model, or load the model "
                              "that computed it")


def import_session(inspector: Inspector, export: ExportFile) -> dict:
    """Store a checked export under its session id, which must not exist yet; return what was written.

    Landmarks and chunks go through the landmark store's put script, then the messages, state,
    meta fields and usage counters are written in one transaction.
    """
    session_id = export.session_id
    if inspector.client.exists(*_session_keys(inspector, session_id)):
        raise ValueError(f"session {session_id!r} already exists under prefix {inspector.keys.prefix!r}; "
                         f"delete it first (`ctxmem inspect delete {session_id}`) or import into another "
                         "prefix (--prefix)")
    store = inspector.landmark_store
    for kind in ITEM_KINDS:
        for index, blob in export.items[kind]:
            if store.put_blob(kind, blob, session_id, index) == "pending":
                raise ConnectionError(f"Redis became unreachable while importing session {session_id!r}; "
                                      "delete the partial session and import again")
    _write_session_keys(inspector, export)
    return {"session": session_id, "landmarks": len(export.items["landmark"]),
            "chunks": len(export.items["chunk"]), "messages": len(export.messages),
            "state": export.state is not None}


def _session_keys(inspector: Inspector, session_id: str) -> list[str]:
    keys = inspector.keys
    return [keys.meta(session_id), keys.state(session_id), keys.messages(session_id), keys.landmarks(session_id),
            keys.chunks(session_id), keys.usage(session_id)]


def _write_session_keys(inspector: Inspector, export: ExportFile) -> None:
    keys, session_id = inspector.keys, export.session_id
    pipeline = inspector.client.pipeline(transaction=True)
    for start in range(0, len(export.messages), 1000):
        pipeline.rpush(keys.messages(session_id), *export.messages[start:start + 1000])
    if export.state is not None:
        pipeline.set(keys.state(session_id), export.state)
    if export.meta:
        pipeline.hset(keys.meta(session_id), mapping=export.meta)
    if export.usage:
        pipeline.hset(keys.usage(session_id), mapping=export.usage)
    pipeline.execute()
    updated = export.meta.get("updated")
    inspector.client.zadd(keys.sessions(), {session_id: _timestamp(updated) if updated else time.time()})
    logger.info("imported session %r", session_id)
