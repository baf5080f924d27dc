"""The worker's delivery contract with a real Redis and real ``moderation worker`` processes.

Every test ends by checking the one invariant the product promises: each submitted event has exactly one
decision (one record, one entry on the decisions stream) or one dead-letter entry.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.core import images
from tests.waiting import eventually
from tests.worker_proc import running_worker, start_worker
from worker.errors import ErrorReason
from worker.ingress.producer import Producer
from worker.keys import Keys
from worker.records import Decision, Event, Priority, Verdict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few good images of different sizes and the bad inputs the worker must turn into error decisions."""
    d = tmp_path_factory.mktemp("imgs")
    for i in range(6):
        (d / f"good{i}.jpg").write_bytes(images.jpeg(96 + 40 * i, 80 + 30 * i, seed=i))
    (d / "big.jpg").write_bytes(images.jpeg(1024, 768, seed=9))
    (d / "empty.jpg").write_bytes(b"")
    (d / "random.jpg").write_bytes(bytes(range(256)) * 8)
    full = images.jpeg(200, 200, seed=3)
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    return d


BAD = {
    "empty.jpg": ErrorReason.EMPTY_FILE,
    "random.jpg": ErrorReason.NOT_AN_IMAGE,
    "truncated.jpg": ErrorReason.TRUNCATED_IMAGE,
    "missing.jpg": ErrorReason.FILE_NOT_FOUND,
}


def events_for(image_dir: Path, n: int, bad_every: int = 0, prefix: str = "item") -> list[Event]:
    goods = sorted(p.name for p in image_dir.glob("good*.jpg"))
    bads = sorted(BAD)
    out = []
    for i in range(n):
        name = (
            bads[(i // bad_every) % len(bads)] if bad_every and i % bad_every == 0 else goods[i % len(goods)]
        )
        out.append(Event(item_id=f"{prefix}-{i}", image_uri=str(image_dir / name)))
    return out


KEYS = Keys("moderation")


def stream_event_ids(redis_url: str, ns: str = "moderation") -> list[str]:
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    return [f["event_id"] for _, f in client.xrange(Keys(ns).decisions)]


def held(redis_url: str, stream: str = KEYS.events) -> int:
    """Entries read by some worker and not acked yet (the pending entries list)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return int(client.xpending(stream, KEYS.group)["pending"])


def unread(redis_url: str, stream: str = KEYS.events) -> int:
    """Entries no worker has read yet (acked ones are deleted, so the rest of the stream is held)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return int(client.xlen(stream)) - held(redis_url, stream)


def wait_for(producer: Producer, events: list[Event], timeout: float) -> dict[str, Decision]:
    got = producer.wait([e.event_id for e in events], timeout=timeout)
    assert len(got) == len(events), f"{len(events) - len(got)} of {len(events)} events undecided"
    return got


def assert_exactly_once(redis_url: str, events: list[Event]) -> None:
    counts = Counter(stream_event_ids(redis_url))
    want = {e.event_id for e in events}
    assert set(counts) == want
    assert max(counts.values()) == 1, [e for e, c in counts.items() if c > 1][:5]


def test_500_events_give_exactly_500_decisions_with_bad_images_in_shared_batches(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path
) -> None:
    events = events_for(image_dir, 500, bad_every=10)
    with running_worker(redis_url, tmp_path, tiny_checkpoint) as w:
        producer.submit_many(events)
        got = wait_for(producer, events, timeout=180)
        log = w.log()
    assert_exactly_once(redis_url, events)
    by_batch: dict[str | None, set[Verdict]] = {}
    for e in events:
        d = got[e.event_id]
        assert d.item_id == e.item_id
        name = Path(e.image_uri).name
        if name in BAD:
            assert d.verdict == Verdict.ERROR and d.reason == BAD[name], (name, d.reason, d.detail)
        else:
            assert d.verdict in (Verdict.ALLOW, Verdict.REVIEW, Verdict.BLOCK) and d.ai_score is not None
            assert d.model_version and d.crops and d.deciding_crop == 0
        by_batch.setdefault(d.batch_id, set()).add(d.verdict)
    mixed = [b for b, v in by_batch.items() if Verdict.ERROR in v and len(v) > 1]
    assert mixed, "error decisions never shared a batch with scored images"
    assert len(by_batch) < 500, "no cross-event batching happened"
    assert "Traceback" not in log


def test_same_event_twice_gives_one_decision_record(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path
) -> None:
    event = Event(item_id="dup", image_uri=str(image_dir / "good0.jpg"), event_id="evt-dup")
    with running_worker(redis_url, tmp_path, tiny_checkpoint):
        producer.send(event)
        first = wait_for(producer, [event], 60)[event.event_id]
        producer.send(event)
        producer.send(event)
        later = Event(item_id="after", image_uri=str(image_dir / "good1.jpg"))
        producer.send(later)
        wait_for(producer, [later], 60)
    assert stream_event_ids(redis_url).count("evt-dup") == 1
    assert producer.decisions(["evt-dup"])["evt-dup"] == first


def _wait_until(predicate: Callable[[], object], timeout: float) -> None:
    eventually(predicate, "the condition", timeout)


FAST_RECLAIM = {
    "MODERATION_VISIBILITY_TIMEOUT_S": "3",
    "MODERATION_RECLAIM_INTERVAL_S": "0.5",
    "MODERATION_MAX_DELIVERIES": "10",  # three kills must not dead-letter what a killed worker held
}


def test_repeated_kill_9_mid_batch_loses_nothing_and_decides_each_event_once(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path
) -> None:
    big = [Event(item_id=f"big-{i}", image_uri=str(image_dir / "big.jpg")) for i in range(300)]
    producer.submit_many(big)
    for kill in range(3):
        w = start_worker(redis_url, tmp_path, tiny_checkpoint, env=FAST_RECLAIM)
        try:
            w.wait_ready()
            target = 20 * (kill + 1)

            def enough(t: int = target) -> bool:
                return len(stream_event_ids(redis_url)) >= t

            eventually(enough, f"{target} decisions", 120)
            assert held(redis_url) > 0, "nothing was held at the kill"
            w.kill()  # SIGKILL: no drain, no acks; what it held stays in the pending entries list
        finally:
            if w.proc.poll() is None:
                w.kill()
    decided_before = len(stream_event_ids(redis_url))
    assert decided_before < len(big), "the workers finished everything before they were killed"
    with running_worker(redis_url, tmp_path, tiny_checkpoint, env=FAST_RECLAIM) as w:
        wait_for(producer, big, 180)
        log = w.log()
    assert_exactly_once(redis_url, big)
    assert not producer.store.dead_letters()
    assert "entries_reclaimed" in log  # the dead workers' entries came back through XAUTOCLAIM
    assert held(redis_url) == 0 and unread(redis_url) == 0


def test_sigterm_finishes_in_flight_batch_acks_it_and_loses_nothing(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path
) -> None:
    big = [Event(item_id=f"t-{i}", image_uri=str(image_dir / "big.jpg")) for i in range(300)]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    w = start_worker(redis_url, tmp_path, tiny_checkpoint)
    w.wait_ready()
    producer.submit_many(big)
    _wait_until(lambda: len(stream_event_ids(redis_url)) >= 20, 120)
    assert held(redis_url) > 0
    assert w.stop(signal.SIGTERM) == 0
    decided = len(stream_event_ids(redis_url))
    assert decided < len(big)
    # Everything the worker held was decided and acked; the rest was never read: nothing waits for a
    # visibility timeout.
    assert held(redis_url) == 0
    assert client.xlen(KEYS.events) + decided == len(big)
    with running_worker(redis_url, tmp_path, tiny_checkpoint):
        wait_for(producer, big, 180)
    assert_exactly_once(redis_url, big)


def test_urgent_events_jump_the_queue(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path
) -> None:
    normal = events_for(image_dir, 120, prefix="n")
    urgent = [
        Event(item_id=f"u-{i}", image_uri=str(image_dir / "good0.jpg"), priority=Priority.URGENT)
        for i in range(5)
    ]
    producer.submit_many(normal)
    producer.submit_many(urgent)  # enqueued last, before any worker runs
    with running_worker(
        redis_url, tmp_path, tiny_checkpoint, env={"MODERATION_PREFETCH": "4", "MODERATION_MAX_BATCH": "4"}
    ):
        got = wait_for(producer, normal + urgent, 120)
    order = stream_event_ids(redis_url)
    urgent_pos = [order.index(e.event_id) for e in urgent]
    assert max(urgent_pos) < 20, urgent_pos
    assert all(got[e.event_id].verdict != Verdict.ERROR for e in urgent)
