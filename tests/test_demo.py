"""The demo's split of the play and its worker's feeding, in this process on real Redis."""

from __future__ import annotations

from ctxmem.demo import SETTINGS, WORDS_PER_TURN, play_passages, session_ids, session_parts
from ctxmem.demo_worker import feed_session
from ctxmem.manager import MemoryManager


def test_parts_cover_the_play_in_order():
    passages = play_passages()
    parts = session_parts(3)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert [passage for part in parts for passage in part] == passages
    assert all(len(passage.split()) >= WORDS_PER_TURN for passage in passages[:-1])
    assert session_ids(3) == ["tempest-1-of-3", "tempest-2-of-3", "tempest-3-of-3"]


def test_feeding_continues_and_wraps_around(reference, redis_client):
    client, prefix = redis_client
    model, tokenizer = reference
    manager = MemoryManager(model, tokenizer, client, prefix=prefix, settings=SETTINGS)
    passages = ["First passage of the part.", "Second passage of the part."]
    events: list[dict] = []

    feed_session(manager.session("wrap"), passages, 1, "You read a play.", 4, events.append)
    resumed = MemoryManager(model, tokenizer, client, prefix=prefix).session("wrap")  # as a new process would
    feed_session(resumed, passages, 2, "You read a play.", 4, events.append)

    roles = [record["message"]["role"] for record in resumed.records]
    assert roles == ["system"] + ["user", "assistant"] * 3
    users = [record["message"]["content"] for record in resumed.records if record["message"]["role"] == "user"]
    assert users == [passages[0], passages[1], passages[0]]
    assert [event["passage"] for event in events] == [0, 1, 0]
    assert [event["messages"] for event in events] == [3, 5, 7]
    assert manager.session_store.message_count("wrap") == 7
