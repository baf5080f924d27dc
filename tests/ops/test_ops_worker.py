"""A real ``moderation worker`` process: its metrics endpoint, JSON logs and Sentry."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.ops.sentry_sink import sentry_sink
from tests.worker_proc import start_worker
from worker.ingress.producer import Producer
from worker.process.localredis import free_port
from worker.records import Event, Verdict
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


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, sorted labels) -> value


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k[1])[label]: v for k, v in samples.items() if k[0] == name and v}


def _total(scrapes: list[Samples], name: str) -> float:
    """Sum one unlabelled metric over several worker processes, as a PromQL ``sum`` would."""
    return sum(s.get((name, ()), 0.0) for s in scrapes)


def _total_by(scrapes: list[Samples], name: str, label: str) -> dict[str, float]:
    """Sum one metric over several worker processes, as a PromQL ``sum by (label)`` would."""
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
                    _total_by(scrapes, "moderation_decisions_total", "verdict") == verdicts
                    and _total(scrapes, "moderation_duplicate_deliveries_total") == 1
                    and _total_by(scrapes, "moderation_dead_letters_total", "reason")
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

    assert _total_by(scrapes, "moderation_decisions_total", "verdict") == verdicts
    assert _total_by(scrapes, "moderation_errors_total", "reason") == reasons
    assert _total_by(scrapes, "moderation_dead_letters_total", "reason") == {"malformed_event": 1}
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
        assert ("moderation_queue_depth", (("queue", "{moderation}:events"),)) in s

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
        assert row["entry_id"]  # the stream entry it settled
    assert any(r["event"] == "dead_lettered" and r["reason"] == "malformed_event" for r in rows)
    assert any(r.get("logger", "").startswith("celery") for r in rows), "Celery's own lines are missing"
    assert sum(r["event"] == "shutdown_requested" for r in rows) == 2
