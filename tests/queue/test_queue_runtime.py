"""The worker runtime in-process (a burst worker): real Redis, a real tiny model, no subprocess, no Celery.

The same wiring ``moderation worker`` runs, started and drained by hand, so the consumer, batcher and write
script are exercised in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import redis

from tests.core import images
from tests.queue.test_queue_worker import _wait_until
from worker.delivery.store import DecisionStore
from worker.errors import ModerationError
from worker.ingress.consumer import StreamConsumer, ensure_groups
from worker.ingress.producer import Producer
from worker.ops.metrics import Metrics
from worker.process.runtime import Runtime
from worker.records import Decision, Event, Verdict
from worker.scoring.scorer import Prepared, Scorer
from worker.settings import Settings


class Pinned:
    """The simplest ScorerSource: one model, never swapped."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.batches = 0

    def current(self) -> Scorer:
        return self.scorer

    def observe(
        self,
        items: Sequence[tuple[Event, Prepared | ModerationError]],
        decisions: Sequence[Decision],
        model_s: float,
    ) -> None:
        self.batches += 1


def test_runtime_decides_dead_letters_drains_and_leaves_the_group(
    redis_url: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        home=tmp_path / "home",
        device="cpu",
        decode_threads=2,
        max_batch=16,
        read_block_ms=50,
        log_format="json",
    )
    img = tmp_path / "a.jpg"
    img.write_bytes(images.jpeg(120, 90, seed=1))
    source = Pinned(Scorer.load(str(tiny_checkpoint), settings))
    runtime = Runtime(settings, source=source, hostname="burst").start()
    producer = Producer(settings)
    events = [Event(item_id=f"r{i}", image_uri=str(img)) for i in range(40)]
    try:
        runtime.start_consuming()
        producer.send_raw("not json")
        producer.submit_many(events)
        producer.send(events[0])  # a redelivery of a decided event: counted, writes nothing
        got = producer.wait([e.event_id for e in events], timeout=60)
        _wait_until(lambda: producer.backlog()[runtime.keys.events] == 0, 30)
    finally:
        runtime.close()
    assert len(got) == len(events) and all(d.verdict != Verdict.ERROR for d in got.values())
    assert source.batches >= 3  # 40 one-crop events, at most 16 crops per call
    assert runtime.consumer.held == 0
    letters = producer.store.dead_letters()
    assert [f["reason"] for _, f in letters] == ["malformed_event"]
    assert runtime.metrics.duplicates._value.get() == 1
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.xlen(runtime.keys.decisions) == len(events)
    assert client.xinfo_consumers(runtime.keys.events, runtime.keys.group) == []  # it left the group
    assert not client.exists(runtime.keys.worker("burst"))  # heartbeat removed
    producer.close()


def test_entries_held_for_long_are_refreshed_without_counting_a_delivery(
    redis_url: str, tmp_path: Path
) -> None:
    """A slow batch must not look like a dead worker: its entries' idle time is reset (XCLAIM JUSTID)."""
    settings = Settings(redis_url=redis_url, home=tmp_path, visibility_timeout_s=3)
    client = redis.Redis.from_url(redis_url)
    store = DecisionStore(client)
    consumer = StreamConsumer(settings, client, store, None, Metrics(), "slow")  # type: ignore[arg-type]
    ensure_groups(client, store.keys)
    client.xadd(store.keys.events, {"event": "{}"})
    [(stream, entry_id, _, deliveries)] = consumer._read(10)
    assert deliveries == 1
    consumer._held[(stream, entry_id)] = time.monotonic() - 2  # read two seconds ago, still in its batch
    time.sleep(1.2)
    consumer._refresh(time.monotonic())
    [row] = client.xpending_range(stream, store.keys.group, "-", "+", 10)
    assert int(row["time_since_delivered"]) < 1000 and int(row["times_delivered"]) == 1
