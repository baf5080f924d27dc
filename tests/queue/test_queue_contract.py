"""The stream contract: what producers may put on the streams, and what a worker does with anything else.

Hostile entries of every shape go through a real worker with good events behind them: each ends as one
dead-letter entry that keeps its whole body and says why, the worker never exits, and the good events are
decided. A producer with nothing but ``redis-cli`` gets its decision; an event with a field this worker does
not know is decided; a newer major schema version waits in the dead-letter stream for an upgrade.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import run_cli
from tests.core import images
from tests.queue.test_queue_worker import KEYS, _wait_until, assert_exactly_once, held, unread, wait_for
from tests.worker_proc import running_worker
from worker.delivery.deadletter import DeadLetterQueue
from worker.delivery.store import DecisionStore
from worker.errors import SchemaError
from worker.ingress.contract import SCHEMAS, schema_json, schema_path
from worker.ingress.producer import BacklogFull, Producer
from worker.records import DECISION_SCHEMA_VERSION, Decision, Event, UnsupportedVersion, Verdict
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contract") / "good.jpg"
    path.write_bytes(images.jpeg(120, 90, seed=5))
    return path


def hostile_entries(image: Path) -> list[tuple[dict[str, bytes], str]]:
    """(entry fields, expected dead-letter reason) for every shape a producer can get wrong."""
    ok = {"item_id": "x", "image_uri": str(image)}

    def event(obj: object) -> dict[str, bytes]:
        return {"event": json.dumps(obj).encode()}

    return [
        ({"event": b"this is not json"}, "malformed_event"),
        ({"event": b"null"}, "malformed_event"),
        ({"event": b"[]"}, "malformed_event"),
        ({"event": b'[["a"], {}]'}, "malformed_event"),  # a task-style (args, kwargs) pair
        ({"event": b"42"}, "malformed_event"),
        ({"event": b""}, "malformed_event"),
        ({"event": b"[" * 5000 + b"]" * 5000}, "malformed_event"),  # nesting deeper than any parser allows
        ({"event": b"\xff\xfe\x00garbage"}, "malformed_event"),  # not UTF-8
        ({"body": b"{}"}, "malformed_event"),  # no `event` field
        (event({"item_id": 3, "image_uri": str(image)}), "malformed_event"),
        (event({"item_id": "x"}), "malformed_event"),
        (event({**ok, "metadata": "not an object"}), "malformed_event"),
        (event({**ok, "submitted_at": "yesterday"}), "malformed_event"),
        (event({**ok, "event_id": ""}), "malformed_event"),
        (event({**ok, "schema_version": 2}), "unsupported_version"),
        (event({**ok, "event_id": "too-big", "metadata": {"pad": "x" * 150_000}}), "event_too_large"),
    ]


def test_hostile_entries_are_dead_lettered_whole_and_good_events_behind_them_are_decided(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, good_image: Path, tmp_path: Path
) -> None:
    raw_client: Any = redis.Redis.from_url(redis_url)
    hostile = hostile_entries(good_image)
    env = {"MODERATION_MAX_EVENT_BYTES": "100000"}
    with running_worker(redis_url, tmp_path, tiny_checkpoint, env=env) as w:
        goods: list[Event] = []
        for i, (fields, _) in enumerate(hostile):
            raw_client.xadd(KEYS.events, fields)
            good = Event(item_id=f"behind-{i}", image_uri=str(good_image))
            producer.send(good)
            goods.append(good)
        got = wait_for(producer, goods, 120)
        dlq = DeadLetterQueue(producer.store)
        _wait_until(lambda: len(dlq) >= len(hostile), 30)  # the goods behind them are decided already
        assert w.proc.poll() is None, "a hostile entry stopped the worker"
        log = w.log()
    assert all(d.verdict != Verdict.ERROR for d in got.values())
    assert_exactly_once(redis_url, goods)
    letters = list(DeadLetterQueue(producer.store).entries())
    assert [d.reason for d in letters] == [reason for _, reason in hostile]
    stored = [dict(f) for _, f in raw_client.xrange(KEYS.deadletter)]
    for (fields, reason), letter, entry in zip(hostile, letters, stored, strict=True):
        assert letter.detail, reason
        body = fields.get("event")
        if body is None:  # no event field: the whole entry is kept
            assert json.loads(letter.raw) == {k: v.decode() for k, v in fields.items()}
        elif entry.get(b"raw_encoding") == b"base64":
            assert base64.b64decode(entry[b"raw"]) == body
        else:
            assert entry[b"raw"] == body  # whole, never truncated
    too_big = letters[-1]
    assert too_big.event_id == "too-big" and len(too_big.raw) > 150_000 and "100000" in too_big.detail
    assert "newer than this worker reads" in letters[-2].detail
    assert held(redis_url) == 0 and unread(redis_url) == 0  # every entry was acked and deleted
    assert "Traceback" not in log


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli")
def test_a_redis_cli_producer_and_an_unknown_optional_field_get_decisions(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, good_image: Path, tmp_path: Path
) -> None:
    """No Python on the producer side: XADD, then read the decision record keyed by the returned entry id."""
    plain = json.dumps({"item_id": "from-cli", "image_uri": str(good_image)})
    newer = json.dumps(
        {"event_id": "newer-1", "item_id": "newer", "image_uri": str(good_image), "uploader_region": "eu-1"}
    )
    with running_worker(redis_url, tmp_path, tiny_checkpoint):
        added = []
        for body in (plain, newer):
            out = subprocess.run(
                ["redis-cli", "-u", redis_url, "XADD", KEYS.events, "*", "event", body],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            added.append(out.stdout.strip())
        entry_id = added[0]
        assert entry_id.count("-") == 1
        got = producer.wait([entry_id, "newer-1"], timeout=60)
        record = subprocess.run(
            ["redis-cli", "-u", redis_url, "GET", KEYS.decision(entry_id)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    assert set(got) == {entry_id, "newer-1"}
    assert got[entry_id].item_id == "from-cli" and got[entry_id].verdict != Verdict.ERROR
    assert got["newer-1"].verdict != Verdict.ERROR
    decision = json.loads(record)
    assert decision["schema_version"] == DECISION_SCHEMA_VERSION and decision["event_id"] == entry_id


def test_a_full_backlog_refuses_submits_loudly_and_trims_nothing(redis_url: str, tmp_path: Path) -> None:
    producer = Producer(Settings(redis_url=redis_url, home=tmp_path, max_backlog=5))
    first = [Event(item_id=f"i{i}", image_uri="s3://b/k.jpg") for i in range(4)]
    producer.submit_many(first)
    with pytest.raises(BacklogFull) as bulk:
        producer.submit_many([Event(item_id=f"j{i}", image_uri="s3://b/k.jpg") for i in range(2)])
    assert bulk.value.length == 4 and bulk.value.limit == 5 and bulk.value.submitted == []
    producer.submit("fifth", "s3://b/k.jpg")
    with pytest.raises(BacklogFull, match="MODERATION_MAX_BACKLOG"):
        producer.submit("sixth", "s3://b/k.jpg")
    assert producer.backlog()[KEYS.events] == 5  # nothing trimmed, nothing added past the limit
    urgent = producer.submit("urgent", "s3://b/k.jpg", priority="urgent")  # each stream has its own bound
    assert producer.backlog()[KEYS.urgent] == 1 and urgent.priority == "urgent"
    out = run_cli("submit", "x.jpg", REDIS_URL=redis_url, MODERATION_MAX_BACKLOG="5", timeout=60)
    assert out.returncode == 1 and "MODERATION_MAX_BACKLOG" in out.stderr and "Traceback" not in out.stderr
    producer.close()


def test_event_contract_keeps_unknown_fields_and_refuses_newer_major_versions() -> None:
    event = Event.from_json('{"item_id": "a", "image_uri": "s3://b/a.jpg", "new_field": [1, 2]}')
    assert event.extra == {"new_field": [1, 2]}
    assert json.loads(event.model_dump_json())["new_field"] == [1, 2]  # kept when passed on
    with pytest.raises(UnsupportedVersion, match="newer than this worker reads"):
        Event.from_json('{"item_id": "a", "image_uri": "s3://b/a.jpg", "schema_version": 2}')
    with pytest.raises(SchemaError):
        Event.from_json('{"item_id": "a", "image_uri": "s3://b/a.jpg", "schema_version": 0}')
    decision = Decision(item_id="a", event_id="e", image_uri="u", verdict=Verdict.ALLOW)
    assert json.loads(decision.to_json())["schema_version"] == DECISION_SCHEMA_VERSION


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_checked_in_schemas_match_the_models_and_the_cli_prints_them(name: str) -> None:
    assert schema_path(name).read_text() == schema_json(name), (
        f"{schema_path(name)} is stale: run `python -m worker.ingress.contract`"
    )
    out = run_cli("schema", name, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == json.loads(schema_json(name))


def test_schema_command_names_the_choices() -> None:
    out = run_cli("schema", "nope", timeout=60)
    assert out.returncode == 2 and "event, decision" in out.stderr and "Traceback" not in out.stderr


def test_store_keys_share_one_cluster_slot(redis_url: str) -> None:
    """Every key a multi-key script touches carries the same hash tag."""
    store = DecisionStore.from_url(redis_url, "tenant-a")
    keys = [
        store.keys.events,
        store.keys.urgent,
        store.keys.decision("e"),
        store.keys.item("i"),
        store.keys.audit("e"),
        store.keys.decisions,
        store.keys.review,
        store.keys.overrides,
        store.keys.deadletter,
    ]
    assert all(k.startswith("{tenant-a}:") for k in keys)
    client = redis.Redis.from_url(redis_url)
    try:
        slots = {client.execute_command("CLUSTER", "KEYSLOT", k) for k in keys}
    except redis.ResponseError:  # cluster support disabled: compute nothing, the prefix check stands
        return
    assert len(slots) == 1
