"""The inspect API against real Redis: listings, detail, search, delete, export and import."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from ctxmem.fingerprint import model_fingerprint
from ctxmem.inspect import Inspector, NotFoundError
from ctxmem.inspect.search import search_keys
from ctxmem.inspect.transfer import ImportFileError, check_model, export_session, import_session, read_export
from ctxmem.store.keys import KeySchema
from ctxmem.store.landmarks import LandmarkStore
from ctxmem.store.records import LandmarkMismatchError
from tests.inspect_data import (
    OTHER_FINGERPRINT, TINY_FINGERPRINT, feed_conversation, session_snapshot, tiny_landmark, write_landmarks,
)


@pytest.fixture
def conversation(reference, redis_client):
    """A three-turn conversation with attention statistics, under the test's prefix."""
    client, prefix = redis_client
    model, tokenizer = reference
    manager = feed_conversation(model, tokenizer, client, prefix, "talk")
    return manager, Inspector(client, prefix)


def test_sessions_lists_both_kinds(conversation, redis_client):
    client, prefix = redis_client
    write_landmarks(client, prefix, "reading", 3)
    manager, inspector = conversation

    summaries = {summary.session: summary for summary in inspector.sessions()}
    assert sorted(summaries) == ["reading", "talk"]
    talk, reading = summaries["talk"], summaries["reading"]
    assert talk.kind == "conversation"
    assert talk.messages == 6
    assert talk.turns == 3
    assert talk.tokens_seen == manager.session("talk").saturation().tokens_seen
    assert talk.landmarks == len(manager.session("talk").stream.memory.landmarks) > 0
    assert 0 < talk.saturation <= 1
    assert reading.kind == "landmarks"
    assert reading.landmarks == 3
    assert reading.tokens_seen is None
    assert reading.saturation is None


def test_timeline_counts_evictions_and_landmarks(conversation):
    manager, inspector = conversation
    timeline = inspector.timeline("talk")
    history = manager.session("talk").history
    assert [turn.tokens_seen for turn in timeline.turns] == [entry["tokens_seen"] for entry in history]
    assert sum(turn.evictions for turn in timeline.turns) == history[-1]["eviction_events"]
    # One landmark per evicted chunk, each counted in the turn that created it.
    assert [turn.landmarks_created for turn in timeline.turns] == [turn.evictions for turn in timeline.turns]
    assert [landmark.index for landmark in timeline.landmarks] == list(range(len(timeline.landmarks)))


def test_landmarks_pages_through_ten_thousand(redis_client):
    client, prefix = redis_client
    write_landmarks(client, prefix, "big", 10_000)
    inspector = Inspector(client, prefix)

    everything = inspector.landmarks("big")
    assert everything.total == 10_000
    assert [row.index for row in everything.landmarks] == list(range(10_000))
    page = inspector.landmarks("big", offset=9_990, limit=50)
    assert [row.index for row in page.landmarks] == list(range(9_990, 10_000))
    middle = inspector.landmarks("big", offset=4_321, limit=3)
    assert [row.index for row in middle.landmarks] == [4_321, 4_322, 4_323]
    row = middle.landmarks[0]
    landmark = tiny_landmark("big", 4_321)
    assert row.text == landmark.record.text
    assert (row.token_start, row.token_end) == (4 + 32 * 4_321, 36 + 32 * 4_321)
    assert row.bytes == len(landmark.to_blob())
    assert row.key_norm == pytest.approx(float(landmark.keys.norm(dim=-1).mean()), rel=1e-6)
    assert row.injected == 0
    assert row.attention_mass == 0.0


def test_landmark_detail_has_layer_stats(conversation):
    manager, inspector = conversation
    stored = manager.landmark_store.get("talk", 1)
    detail = inspector.landmark("talk", 1)
    assert detail.record["text"] == stored.record.text
    assert detail.chunk_stored  # exact resume stores every chunk
    assert len(detail.layers) == stored.record.layers
    for layer in detail.layers:
        keys = stored.keys[layer.layer].float()  # [kv_heads, 1, head_dim]
        assert layer.key_norm == pytest.approx(float(keys.norm(dim=-1).mean()), rel=1e-5)
        assert layer.key_max == pytest.approx(float(keys.max()))
        assert layer.value_std == pytest.approx(float(stored.values[layer.layer].float().std(correction=0)), rel=1e-5)


def test_unknown_session_and_landmark(conversation):
    _, inspector = conversation
    with pytest.raises(NotFoundError, match="session 'ghost' not found"):
        inspector.landmarks("ghost")
    with pytest.raises(NotFoundError, match="session 'talk' has no landmark 999"):
        inspector.landmark("talk", 999)


def test_search_text_and_keys(conversation, reference):
    manager, inspector = conversation
    texts = {landmark.record.index: landmark.record.text for landmark in manager.session("talk").stream.memory.landmarks}
    word = "BERNARDO"
    hits = inspector.search_text("talk", word.lower(), limit=100)
    assert [hit["index"] for hit in hits] == [index for index, text in texts.items() if word in text.upper()]
    assert all(hit["score"] == texts[hit["index"]].upper().count(word) for hit in hits)

    model, tokenizer = reference
    ranked = search_keys(inspector, "talk", texts[2], model, tokenizer, limit=len(texts))
    scores = [hit["score"] for hit in ranked]
    assert scores == sorted(scores, reverse=True)
    assert ranked[0]["index"] == 2  # a landmark's own text matches it best


def test_search_keys_rejects_another_model(redis_client, reference):
    client, prefix = redis_client
    write_landmarks(client, prefix, "tiny", 2)
    model, tokenizer = reference
    with pytest.raises(LandmarkMismatchError, match="computed by another model"):
        search_keys(Inspector(client, prefix), "tiny", "hello", model, tokenizer)


def test_delete_one_landmark_of_a_run(redis_client, conversation):
    client, prefix = redis_client
    write_landmarks(client, prefix, "reading", 3)
    _, inspector = conversation
    inspector.delete("reading", 1)
    assert [row.index for row in inspector.landmarks("reading").landmarks] == [0, 2]
    with pytest.raises(ValueError, match="is a conversation"):
        inspector.delete("talk", 0)
    inspector.delete("reading")
    assert "reading" not in inspector.session_ids()


def test_export_delete_import_is_byte_identical(conversation, redis_client, reference, tmp_path):
    client, prefix = redis_client
    manager, inspector = conversation
    before = session_snapshot(client, prefix, "talk")
    fence_key = KeySchema(prefix).fence("talk").encode()
    before.pop(fence_key)  # the lock counter is not session data and is not exported
    assert KeySchema(prefix).usage("talk").encode() in before  # attention statistics were on
    logits = manager.session("talk").next_logits.clone()

    out = io.StringIO()
    counts = export_session(inspector, "talk", out)
    assert counts["landmarks"] > 0
    assert counts["chunks"] > 0
    assert counts["state"]
    manager.delete("talk")
    assert session_snapshot(client, prefix, "talk") == {}

    path = tmp_path / "talk.jsonl"
    path.write_text(out.getvalue(), encoding="utf-8")
    export = read_export(path)
    check_model(export, model_fingerprint(reference[0]))
    import_session(inspector, export)
    after = session_snapshot(client, prefix, "talk")
    assert after == before

    model, tokenizer = reference
    resumed = type(manager)(model, tokenizer, client, prefix=prefix).session("talk")
    assert torch.equal(resumed.next_logits, logits)


@pytest.fixture
def export_lines(redis_client) -> list[dict]:
    """The lines of an export of a 3-landmark session, which is deleted afterwards."""
    client, prefix = redis_client
    write_landmarks(client, prefix, "reading", 3)
    inspector = Inspector(client, prefix)
    out = io.StringIO()
    export_session(inspector, "reading", out)
    inspector.delete("reading")
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _file(tmp_path, lines: list) -> str:
    path = tmp_path / "session.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_import_rejects_malformed_line(export_lines, tmp_path):
    lines = [*export_lines[:2], "{not json", *export_lines[2:]]
    with pytest.raises(ImportFileError, match=r"line 3 of .* is not valid JSON"):
        read_export(_file(tmp_path, lines))


def test_import_rejects_edited_record(export_lines, tmp_path):
    export_lines[3]["record"]["text"] = "something else"
    with pytest.raises(ImportFileError, match="line 4 .* differs from the record in its blob"):
        read_export(_file(tmp_path, export_lines))


def test_import_rejects_truncated_file(export_lines, tmp_path):
    with pytest.raises(ImportFileError, match=r"landmarks 2 \(header: 3\)"):
        read_export(_file(tmp_path, export_lines[:-1]))


def test_import_rejects_another_models_record(export_lines, tmp_path, redis_client):
    other = tiny_landmark("reading", 2, fingerprint=OTHER_FINGERPRINT)
    export_lines[-1]["record"] = other.record.model_dump(mode="json")
    export_lines[-1]["blob"] = base64.b64encode(other.to_blob()).decode()
    with pytest.raises(ImportFileError, match="line 5 .* landmark 2 was computed by another model .*weights_hash"):
        read_export(_file(tmp_path, export_lines))


def test_import_checks_the_model(export_lines, tmp_path, reference):
    export = read_export(_file(tmp_path, export_lines))
    check_model(export, TINY_FINGERPRINT)
    with pytest.raises(ImportFileError, match="computed by another model"):
        check_model(export, model_fingerprint(reference[0]))


def test_import_refuses_existing_session(export_lines, tmp_path, redis_client):
    client, prefix = redis_client
    inspector = Inspector(client, prefix)
    export = read_export(_file(tmp_path, export_lines))
    import_session(inspector, export)
    stored = LandmarkStore(client, prefix=prefix).get("reading", 2)
    assert stored.to_blob() == base64.b64decode(export_lines[-1]["blob"])
    with pytest.raises(ValueError, match="session 'reading' already exists"):
        import_session(inspector, export)


def test_listing_rejects_corrupt_blob(redis_client):
    client, prefix = redis_client
    write_landmarks(client, prefix, "reading", 3)
    client.set(KeySchema(prefix).landmark("reading", 1), b"\x93not a landmark")
    with pytest.raises(LandmarkMismatchError, match="session 'reading' landmark 1: invalid blob"):
        Inspector(client, prefix).landmarks("reading")


def test_import_rejects_edited_meta_fingerprint(export_lines, tmp_path):
    meta = next(line for line in export_lines if line["kind"] == "meta")
    meta["fields"]["fingerprint"] = OTHER_FINGERPRINT.model_dump_json()
    with pytest.raises(ImportFileError, match="the meta hash was computed by another model"):
        read_export(_file(tmp_path, export_lines))


@pytest.mark.parametrize("field, value", [("0:mass", "banana"), ("0:injected", "-1"), ("zero:injected", "1")])
def test_import_rejects_edited_usage(export_lines, tmp_path, field, value):
    usage = {"kind": "usage", "fields": {field: value}}
    header = export_lines[0]
    header["counts"]["usage"] = 1
    lines = [*(line for line in export_lines if line["kind"] != "usage"), usage]
    with pytest.raises(ImportFileError, match=f"invalid usage field '{field}'"):
        read_export(_file(tmp_path, lines))
