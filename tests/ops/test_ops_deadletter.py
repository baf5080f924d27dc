"""The dead-letter stream against a real Redis and a real worker: paging, selection, replay, purge."""

from __future__ import annotations

import base64
import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from typer.testing import CliRunner

from tests.queue.test_queue_worker import _wait_until
from tests.worker_proc import running_worker
from worker.cli.main import app
from worker.delivery.deadletter import PAGE, DeadLetter, DeadLetterQueue
from worker.delivery.store import DecisionStore
from worker.ingress.consumer import ensure_groups
from worker.ingress.producer import Producer
from worker.keys import Keys
from worker.records import Decision, Event, Verdict
from worker.settings import Settings

KEYS = Keys("moderation")


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
    store.dead_letter("malformed_event", "not UTF-8", b"\xff\xfe{")
    good, named, garbage, binary = DeadLetterQueue(store).entries()
    assert good.event == event and good.item_id == "item-1" and good.event_id == event.event_id
    assert named.event is None and named.event_id == "abc"  # still findable by the id the producer used
    assert garbage.event is None and garbage.event_id is None
    assert garbage.summary()["replayable"] is False
    [(_, raw_entry)] = store.r.xrevrange(store.keys.deadletter, count=1)
    assert raw_entry["raw_encoding"] == "base64" and base64.b64decode(raw_entry["raw"]) == b"\xff\xfe{"
    assert binary.event is None


def test_ops_a_dead_letter_keeps_a_large_event_whole(store: DecisionStore) -> None:
    event = Event(item_id="big", image_uri="s3://b/big.jpg", metadata={"pad": "m" * 150_000})
    _letter(store, event)
    [letter] = DeadLetterQueue(store).entries()
    assert letter.raw == event.model_dump_json() and letter.event == event


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


def test_ops_replay_routes_urgent_keeps_event_ids_and_removes_entries(
    store: DecisionStore, redis_url: str, tmp_path: Path
) -> None:
    normal = [Event(item_id=f"n{i}", image_uri=f"s3://b/{i}") for i in range(3)]
    urgent = Event(item_id="u", image_uri="s3://b/u", priority="urgent")
    for e in [*normal, urgent]:
        _letter(store, e)
    # an entry whose body named no event_id: its entry id stood in, and a replay keeps it
    store.dead_letter(
        "redelivery_limit", "d", '{"item_id": "x", "image_uri": "s3://b/x"}', event_id="1700000000000-0"
    )
    store.dead_letter("malformed_event", "bad", "{oops")
    producer = Producer(Settings(redis_url=redis_url, home=tmp_path))
    dlq = DeadLetterQueue(store)
    seen: list[DeadLetter] = []
    report = dlq.replay(dlq.select(everything=True), producer.send_raw, progress=seen.append)
    assert [d.event_id for d in report.replayed] == [e.event_id for e in [*normal, urgent]] + [
        "1700000000000-0"
    ]
    assert seen == report.replayed
    assert [d.reason for d in report.skipped] == ["malformed_event"]
    bodies = [json.loads(f["event"]) for _, f in store.r.xrange(KEYS.events)]
    assert [b["event_id"] for b in bodies] == [e.event_id for e in normal] + ["1700000000000-0"]
    assert store.r.xlen(KEYS.urgent) == 1
    assert [d.reason for d in dlq.entries()] == ["malformed_event"]
    # --force sends even the malformed body (e.g. after the workers were upgraded)
    forced = dlq.replay(dlq.select(everything=True), producer.send_raw, force=True)
    assert len(forced.replayed) == 1 and len(dlq) == 0
    assert store.r.xlen(KEYS.events) == 5
    producer.close()


def test_ops_purge_deletes_only_the_selected(store: DecisionStore) -> None:
    keep = Event(item_id="keep", image_uri="s3://b/k")
    _letter(store, keep)
    for i in range(5):
        store.dead_letter("malformed_event", "bad", f"{{{i}")
    dlq = DeadLetterQueue(store)
    assert dlq.purge(dlq.select(reasons=["malformed_event"])) == 5
    assert [d.event_id for d in dlq.entries()] == [keep.event_id]


def _crashed_deliveries(client: redis.Redis, stream: str, entry_id: str, times: int) -> None:
    """What a worker that died ``times`` times while deciding this entry leaves in the pending entries list:
    a ghost consumer holds it with that delivery count (each XCLAIM counts one delivery)."""
    ensure_groups(client, KEYS)
    client.xreadgroup(KEYS.group, "ghost", {stream: ">"}, count=1)
    for _ in range(times - 1):
        client.xclaim(stream, KEYS.group, "ghost", 0, [entry_id])


def _good_images(tmp: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    uris = []
    for i in range(n):
        p = tmp / f"good-{i}.png"
        Image.fromarray(rng.integers(0, 256, (72 + i, 80, 3), dtype=np.uint8)).save(p)
        uris.append(str(p))
    return uris


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_ops_past_max_deliveries_an_entry_is_dead_lettered_and_a_replay_decides_it_once(
    redis_url: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, home=tmp_path / "home", max_deliveries=3)
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    good = _good_images(tmp_path, 4)
    poison = [Event(item_id=f"poison-{i}", image_uri=u) for i, u in enumerate(good)]
    urgent = Event(item_id="urgent-1", image_uri=good[0], priority="urgent")
    producer = Producer(settings)
    # These entries already "crashed" workers 3 times: the next delivery (a reclaim) dead-letters them.
    for e in [*poison, urgent]:
        entry_id = producer.send(e)
        stream = KEYS.urgent if e.priority == "urgent" else KEYS.events
        _crashed_deliveries(client, stream, entry_id, settings.max_deliveries)
    producer.send_raw("{not json")
    runner = CliRunner()
    env = {"REDIS_URL": redis_url, "MODERATION_HOME": str(tmp_path / "home")}
    fast = {"MODERATION_VISIBILITY_TIMEOUT_S": "1", "MODERATION_RECLAIM_INTERVAL_S": "0.3"}
    with running_worker(redis_url, tmp_path / "w", tiny_checkpoint, env=fast) as w:
        dlq = DeadLetterQueue(store)
        _wait_until(lambda: len(dlq) >= 6, 60)
        assert {d.reason for d in dlq.entries()} == {"redelivery_limit", "malformed_event"}
        assert store.get(poison[0].event_id) is None
        limit = [d for d in dlq.entries() if d.reason == "redelivery_limit"]
        assert all(d.extra["deliveries"] == "4" and "max_deliveries 3" in d.detail for d in limit)

        listed = runner.invoke(app, ["dlq", "list", "--json"], env=env)
        assert listed.exit_code == 0, listed.output
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {r["event_id"] for r in rows if r["reason"] == "redelivery_limit"} == {
            e.event_id for e in [*poison, urgent]
        }
        assert [r["replayable"] for r in rows if r["reason"] == "malformed_event"] == [False]

        # "the fix is deployed": replay one by event id, then the rest by reason
        one = runner.invoke(app, ["dlq", "replay", "--id", poison[0].event_id], env=env)
        assert one.exit_code == 0, one.output
        first = producer.wait([poison[0].event_id], timeout=60)
        assert first[poison[0].event_id].verdict in {Verdict.ALLOW, Verdict.REVIEW, Verdict.BLOCK}
        rest = runner.invoke(app, ["dlq", "replay", "--reason", "redelivery_limit"], env=env)
        assert rest.exit_code == 0, rest.output
        ids = [e.event_id for e in [*poison, urgent]]
        decided = producer.wait(ids, timeout=60)
        assert set(decided) == set(ids)
        assert [d.reason for d in dlq.entries()] == ["malformed_event"]
        skipped = runner.invoke(app, ["dlq", "replay", "--all"], env=env)
        assert skipped.exit_code == 0 and "skipped 1" in skipped.output
        # A second dead-letter copy of an event that is decided by now: replaying it writes nothing new.
        store.dead_letter("redelivery_limit", "second copy", poison[1].model_dump_json())
        again = runner.invoke(app, ["dlq", "replay", "--id", poison[1].event_id], env=env)
        assert again.exit_code == 0 and "replayed 1" in again.output
        _wait_until(lambda: client.xlen(KEYS.events) == 0, 30)  # read, decided as a duplicate, acked
        producer.close()
        assert w.stop() == 0

    written = [Decision.from_json(f["decision"]) for _, f in client.xrange(store.keys.decisions)]
    per_event = collections.Counter(d.event_id for d in written)
    assert per_event == {e: 1 for e in ids}, "an event was decided more than once, or not at all"
    purged = runner.invoke(app, ["dlq", "purge", "--reason", "malformed_event", "--yes"], env=env)
    assert purged.exit_code == 0, purged.output
    assert len(DeadLetterQueue(store)) == 0


def test_ops_dlq_commands_explain_what_they_need(redis_url: str) -> None:
    runner = CliRunner()
    env = {"REDIS_URL": redis_url}
    no_selector = runner.invoke(app, ["dlq", "replay"], env=env)
    assert no_selector.exit_code == 2
    assert "--reason" in no_selector.output
    empty = runner.invoke(app, ["dlq", "replay", "--all"], env=env)
    assert empty.exit_code == 0 and "nothing to replay" in empty.output
    unset = runner.invoke(app, ["dlq", "list"], env={"REDIS_URL": "", "MODERATION_REDIS_URL": ""})
    assert unset.exit_code == 2 and "REDIS_URL" in unset.output
