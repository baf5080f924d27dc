"""A real ``moderation worker`` process: its metrics endpoint, JSON logs, Sentry, and dead-letter replay."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.ops.sentry_sink import sentry_sink
from tests.worker_proc import running_worker, start_worker
from worker.cli.main import app
from worker.delivery.deadletter import DeadLetterQueue
from worker.delivery.store import DecisionStore
from worker.ingress.producer import Producer
from worker.records import Decision, Event, Verdict
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _images(tmp: Path, n_good: int, n_bad: int, n_missing: int) -> list[str]:
    rng = np.random.default_rng(0)
    uris = []
    for i in range(n_good):
        p = tmp / f"good-{i}.png"
        Image.fromarray(rng.integers(0, 256, (72 + i, 80, 3), dtype=np.uint8)).save(p)
        uris.append(str(p))
    for i in range(n_bad):
        p = tmp / f"bad-{i}.jpg"
        p.write_bytes(b"this is not an image " * (i + 1))
        uris.append(str(p))
    uris += [str(tmp / f"missing-{i}.png") for i in range(n_missing)]
    return uris


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(k[1])[label]: v for k, v in samples.items() if k[0] == name and v}


def _total(scrapes: list[dict], name: str, label: str | None = None) -> dict[str, float] | float:
    """Sum one metric over several worker processes, as a PromQL ``sum by (label)`` would."""
    if label is None:
        return sum(s.get((name, ()), 0.0) for s in scrapes)
    out: collections.Counter[str] = collections.Counter()
    for s in scrapes:
        out.update(by_label(s, name, label))
    return dict(out)


def test_ops_metrics_of_two_worker_processes_add_up_to_the_events_and_every_log_line_is_json(
    redis_url: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Two worker processes, one metrics port each (how several workers per host are scraped)."""
    ports = [free_port(), free_port()]
    settings = Settings(redis_url=redis_url, home=tmp_path / "home")
    uris = _images(tmp_path, n_good=14, n_bad=5, n_missing=3)
    events = [Event(item_id=f"item-{i}", image_uri=u) for i, u in enumerate(uris)]
    with sentry_sink() as sink:
        env = {"SENTRY_DSN": sink.dsn(), "MODERATION_PREFETCH": "8"}
        workers = [
            start_worker(
                redis_url, tmp_path / f"w{i}", tiny_checkpoint, {**env, "MODERATION_METRICS_PORT": str(p)}
            )
            for i, p in enumerate(ports)
        ]
        try:
            for w in workers:
                w.wait_ready()
            producer = Producer(settings)
            producer.submit_many(events)
            producer.send_raw('{"item_id": "no uri"}')  # malformed: dead-lettered
            producer.send_raw(
                events[0].model_dump_json()
            )  # redelivery of an event: counted once as duplicate
            got = producer.wait([e.event_id for e in events], timeout=120)
            assert len(got) == len(events)
            verdicts = collections.Counter(d.verdict.value for d in got.values())
            reasons = collections.Counter(d.reason.value for d in got.values() if d.reason)
            assert reasons == {"not_an_image": 5, "file_not_found": 3}

            deadline = time.monotonic() + 30
            while True:  # metrics follow the decision write by a moment; wait for the last ones
                scrapes = [scrape(p) for p in ports]
                done = (
                    _total(scrapes, "moderation_decisions_total", "verdict") == verdicts
                    and _total(scrapes, "moderation_duplicate_deliveries_total") == 1
                    and _total(scrapes, "moderation_dead_letters_total", "reason")
                )
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            producer.close()
            for w in workers:
                assert w.stop() == 0
            sentry_events = sink.events()
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    w.kill()

    assert _total(scrapes, "moderation_decisions_total", "verdict") == verdicts
    assert _total(scrapes, "moderation_errors_total", "reason") == reasons
    assert _total(scrapes, "moderation_dead_letters_total", "reason") == {"malformed_event": 1}
    assert _total(scrapes, "moderation_duplicate_deliveries_total") == 1
    scored = [d for d in got.values() if d.verdict != Verdict.ERROR]
    assert _total(scrapes, "moderation_ai_score_count") == len(scored)
    assert _total(scrapes, "moderation_ai_score_sum") == pytest.approx(sum(d.ai_score or 0 for d in scored))
    assert _total(scrapes, "moderation_end_to_end_seconds_count") == len(events)
    # The duplicate copy of events[0] is either caught before the model (already decided) or scored again
    # and refused by the write-once sink; either way it was picked up once more.
    rescored = _total(scrapes, "moderation_queue_wait_seconds_count") - len(events)
    assert rescored in (0, 1)
    assert _total(scrapes, "moderation_batch_crops_sum") == len(scored) + rescored  # one crop per image
    assert _total(scrapes, "moderation_model_seconds_count") == _total(
        scrapes, "moderation_batch_crops_count"
    )
    version = next(iter(got.values())).model_version
    for s in scrapes:
        assert any(k[0] == "moderation_model_info" and ("version", version) in k[1] for k in s)
        assert s[("moderation_in_flight", ())] == 0
        assert ("moderation_queue_depth", (("queue", "moderation.events"),)) in s

    # Bad images are Sentry breadcrumbs, never events.
    assert sentry_events == []
    rows = []
    for w in workers:
        lines = w.log().splitlines()
        assert lines
        rows += [json.loads(line) for line in lines]  # every line, Celery's included, is one JSON object
    assert all({"event", "level", "timestamp"} <= set(r) and r.get("component") == "worker" for r in rows)
    decided = {r["event_id"]: r for r in rows if r["event"] == "decided"}
    assert set(decided) == {e.event_id for e in events}
    for e in events:
        row = decided[e.event_id]
        assert row["item_id"] == e.item_id
        assert row["model_version"] == version
        assert row["verdict"] == got[e.event_id].verdict.value
        assert row["task_id"]
    assert any(r["event"] == "dead_lettered" and r["reason"] == "malformed_event" for r in rows)
    assert any(r.get("logger", "").startswith("celery") for r in rows), "Celery's own lines are missing"
    assert sum(r["event"] == "shutdown_requested" for r in rows) == 2


def test_ops_dlq_replay_after_a_fix_decides_each_event_once(
    redis_url: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, home=tmp_path / "home", max_deliveries=3)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    good = _images(tmp_path, n_good=4, n_bad=0, n_missing=0)
    poison = [Event(item_id=f"poison-{i}", image_uri=u) for i, u in enumerate(good)]
    urgent = Event(item_id="urgent-1", image_uri=good[0], priority="urgent")
    runner = CliRunner()
    env = {"REDIS_URL": redis_url, "MODERATION_HOME": str(tmp_path / "home")}
    with running_worker(redis_url, tmp_path / "w", tiny_checkpoint) as w:
        producer = Producer(settings)
        # These events already crashed workers 3 times (as a poison image would): the next delivery goes to
        # the dead-letter stream instead of being decided.
        for e in [*poison, urgent]:
            client.set(store.keys.deliveries(e.event_id), settings.max_deliveries)
            producer.send(e)
        producer.send_raw("{not json")
        dlq = DeadLetterQueue(store)
        deadline = time.monotonic() + 60
        while len(dlq) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {d.reason for d in dlq.entries()} == {"redelivery_limit", "malformed_event"}
        assert store.get(poison[0].event_id) is None

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
        # Only the malformed entry is left; replaying it without --force skips it.
        assert [d.reason for d in dlq.entries()] == ["malformed_event"]
        skipped = runner.invoke(app, ["dlq", "replay", "--all"], env=env)
        assert skipped.exit_code == 0 and "skipped 1" in skipped.output
        # A second dead-letter copy of an event that is decided by now: replaying it writes nothing new.
        store.dead_letter("redelivery_limit", "second copy", poison[1].model_dump_json())
        again = runner.invoke(app, ["dlq", "replay", "--id", poison[1].event_id], env=env)
        assert again.exit_code == 0 and "replayed 1" in again.output
        deadline = time.monotonic() + 30
        while client.get(store.keys.deliveries(poison[1].event_id)) is None and time.monotonic() < deadline:
            time.sleep(0.1)  # the worker counts the delivery, sees the decision and writes nothing
        producer.close()
        assert w.stop() == 0

    stream = [Decision.from_json(f["decision"]) for _, f in client.xrange(store.keys.decisions)]
    per_event = collections.Counter(d.event_id for d in stream)
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
