"""The outbox reaper on a real Redis with real Celery messages: re-send only what is truly lost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from worker.delivery.reaper import UNACKED, Reaper, message_event
from worker.ingress.producer import Producer
from worker.records import Decision, Event, Verdict
from worker.settings import Settings


@pytest.fixture
def producer(redis_url: str, tmp_path: Path) -> Producer:
    return Producer(Settings(redis_url=redis_url, home=tmp_path / "home", reap_grace_s=5))


def reaper_for(producer: Producer, sent: list[str]) -> Reaper:
    return Reaper(producer.settings, producer.store, lambda raw, urgent: sent.append(raw))


def old_event(i: int, age_s: float = 60) -> Event:
    return Event.from_obj({"item_id": f"i{i}", "image_uri": "x.jpg", "submitted_at": time.time() - age_s})


def test_a_pending_event_missing_from_queue_and_workers_is_resent_once(producer: Producer) -> None:
    lost = old_event(1)
    producer.store.register_pending([(lost.event_id, lost.model_dump_json(), lost.submitted_at.timestamp())])
    sent: list[str] = []
    reaper = reaper_for(producer, sent)
    assert reaper.sweep() == 1
    assert [Event.from_json(s).event_id for s in sent] == [lost.event_id]
    assert reaper.sweep() == 0  # re-timed: not again before another grace period


def test_queued_held_and_decided_events_are_left_alone(producer: Producer) -> None:
    queued = old_event(2)
    producer.send(queued)  # a real Celery message, waiting in the queue
    held = old_event(3)
    producer.send(held)
    q = producer.queues.events
    # Move "held" from the queue into kombu's unacked hash the way a consuming worker does.
    raw_messages = producer.store.r.lrange(q, 0, -1)
    for raw in raw_messages:
        found = message_event(raw)
        assert found is not None
        if found[0] == held.event_id:
            producer.store.r.lrem(q, 1, raw)
            producer.store.r.hset(UNACKED, "tag-1", json.dumps([json.loads(raw), "", q]))
    decided = old_event(4)
    producer.store.register_pending([(decided.event_id, decided.model_dump_json(), 0.0)])
    producer.store.write(
        Decision(
            item_id="i4", event_id=decided.event_id, image_uri="x.jpg", verdict=Verdict.ALLOW, ai_score=0.1
        )
    )
    producer.store.register_pending([(decided.event_id, decided.model_dump_json(), 0.0)])  # a late duplicate
    sent: list[str] = []
    assert reaper_for(producer, sent).sweep() == 0
    assert sent == []
    pending = set(producer.store.r.zrange(producer.store.keys.pending, 0, -1))
    assert pending == {queued.event_id, held.event_id}  # the decided one was cleaned up


def test_the_decision_write_settles_the_outbox(producer: Producer) -> None:
    e = old_event(5)
    producer.send(e)
    assert producer.store.r.zscore(producer.store.keys.pending, e.event_id) is not None
    producer.store.write(
        Decision(item_id="i5", event_id=e.event_id, image_uri="x.jpg", verdict=Verdict.ALLOW)
    )
    assert producer.store.r.zscore(producer.store.keys.pending, e.event_id) is None
    assert producer.store.r.hget(producer.store.keys.payload, e.event_id) is None
