"""The dead-letter queue against a real Redis: paging, selection, replay routing and counters, purge."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from worker.delivery.deadletter import PAGE, DeadLetterQueue
from worker.delivery.store import DecisionStore
from worker.ingress.producer import Producer
from worker.process.app import Queues
from worker.records import Event
from worker.settings import Settings


@pytest.fixture
def store(redis_url: str) -> DecisionStore:
    return DecisionStore(redis.Redis.from_url(redis_url, decode_responses=True))


def _letter(store: DecisionStore, event: Event, reason: str = "redelivery_limit") -> str:
    # the same call the worker makes when it gives up on an event
    return store.dead_letter(reason, "delivered 4 times", event.model_dump_json(), event_id=event.event_id)


def test_ops_entries_page_through_a_long_stream_in_order(store: DecisionStore) -> None:
    ids = [_letter(store, Event(item_id=f"i{i}", image_uri=f"s3://b/{i}.jpg")) for i in range(PAGE * 2 + 7)]
    dlq = DeadLetterQueue(store)
    assert len(dlq) == len(ids)
    assert [d.id for d in dlq.entries()] == ids


def test_ops_entries_parse_events_and_keep_malformed_ones_visible(store: DecisionStore) -> None:
    event = Event(item_id="item-1", image_uri="s3://b/1.jpg")
    _letter(store, event)
    store.dead_letter("malformed_event", "image_uri: Field required", '{"event_id": "abc", "item_id": 3}')
    store.dead_letter("malformed_event", "not json", "{oops")
    good, named, garbage = DeadLetterQueue(store).entries()
    assert good.event == event and good.item_id == "item-1" and good.event_id == event.event_id
    assert named.event is None and named.event_id == "abc"  # still findable by the id the producer used
    assert garbage.event is None and garbage.event_id is None
    assert garbage.summary()["replayable"] is False


def test_ops_select_by_reason_stream_id_or_event_id(store: DecisionStore) -> None:
    a, b, c = (Event(item_id=x, image_uri=f"s3://b/{x}") for x in "abc")
    _letter(store, a)
    sid_b = _letter(store, b, reason="internal_error")
    _letter(store, c, reason="internal_error")
    dlq = DeadLetterQueue(store)
    assert [d.event_id for d in dlq.select(reasons=["redelivery_limit"])] == [a.event_id]
    assert [d.event_id for d in dlq.select(ids=[sid_b, c.event_id])] == [b.event_id, c.event_id]
    assert len(dlq.select(everything=True)) == 3
    with pytest.raises(ValueError):
        dlq.select()


def test_ops_replay_resets_counters_routes_urgent_and_removes_entries(
    store: DecisionStore, redis_url: str, tmp_path: Path
) -> None:
    normal = [Event(item_id=f"n{i}", image_uri=f"s3://b/{i}") for i in range(3)]
    urgent = Event(item_id="u", image_uri="s3://b/u", priority="urgent")
    for e in [*normal, urgent]:
        store.r.set(store.keys.deliveries(e.event_id), 4)
        _letter(store, e)
    store.dead_letter("malformed_event", "bad", "{oops")
    producer = Producer(Settings(redis_url=redis_url, home=tmp_path))
    q = Queues("moderation")
    dlq = DeadLetterQueue(store)
    seen = []
    report = dlq.replay(dlq.select(everything=True), producer.send_raw, progress=seen.append)
    assert [d.event_id for d in report.replayed] == [e.event_id for e in [*normal, urgent]]
    assert seen == report.replayed
    assert [d.reason for d in report.skipped] == ["malformed_event"]
    assert store.r.llen(q.events) == 3
    assert store.r.llen(q.urgent) == 1
    assert all(store.r.get(store.keys.deliveries(e.event_id)) is None for e in [*normal, urgent])
    assert [d.reason for d in dlq.entries()] == ["malformed_event"]
    # --force sends even the malformed body (e.g. after the consumer's schema was fixed)
    forced = dlq.replay(dlq.select(everything=True), producer.send_raw, force=True)
    assert len(forced.replayed) == 1 and len(dlq) == 0
    assert store.r.llen(q.events) == 4
    producer.close()


def test_ops_purge_deletes_only_the_selected(store: DecisionStore) -> None:
    keep = Event(item_id="keep", image_uri="s3://b/k")
    _letter(store, keep)
    for i in range(5):
        store.dead_letter("malformed_event", "bad", f"{{{i}")
    dlq = DeadLetterQueue(store)
    assert dlq.purge(dlq.select(reasons=["malformed_event"])) == 5
    assert [d.event_id for d in dlq.entries()] == [keep.event_id]
