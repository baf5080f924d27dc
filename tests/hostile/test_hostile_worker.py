"""Hostile inputs through a real ``moderation worker`` process, submitted with the public Producer API.

Named pipes, devices, symlinks out of the allowed root, symlink loops, traversal paths and under-cap 16-bit
PNGs are mixed with good images while a NaN model is published as ``current``: every event ends with exactly
one decision, the hostile ones with their typed reason, the good ones decided by the good model; the worker
refuses the NaN version once, keeps its PID and drains on SIGTERM. A worker that starts while a broken
version is current serves the last good one.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import redis

from tests.core.images import jpeg
from tests.hostile.conftest import nan_weights, point_at, write_version
from tests.hostile.images import png16
from tests.streams import stream_entries
from tests.worker_proc import running_worker
from worker.ingress.producer import Producer
from worker.keys import Keys
from worker.lifecycle.registry import Registry
from worker.records import Decision, Event, Verdict
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def worker_env(settings: Settings, redis_url: str, roots: list[Path]) -> dict[str, str]:
    env = {
        "REDIS_URL": redis_url,
        "MODERATION_REGISTRY": settings.default_registry,
        "MODERATION_RELOAD_POLL_S": "0.5",
        "MODERATION_LOCAL_ROOTS": ",".join(str(r) for r in roots),
        "MODERATION_LOCAL_READ_TIMEOUT_S": "5",
    }
    if settings.s3_endpoint_url:
        env["MODERATION_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


@pytest.fixture
def producer(redis_url: str, tmp_path: Path) -> Iterator[Producer]:
    p = Producer(Settings(redis_url=redis_url, home=tmp_path / "producer"))
    yield p
    p.close()


@pytest.fixture
def hostile_root(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """Good and hostile sources in one folder; each URI maps to the reason its decision must carry."""
    root = tmp_path / "uploads"
    root.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg(64, 64, seed=99))
    want: dict[str, str | None] = {}
    for i in range(8):
        p = root / f"good{i}.jpg"
        p.write_bytes(jpeg(80 + 8 * i, 72, seed=i))
        want[str(p)] = None
    for i in range(3):
        p = root / f"deep{i}.png"
        p.write_bytes(png16(1800 + 100 * i, 1500))  # 2.7 MP of 16-bit samples in a few hundred KB
        want[str(p)] = None
    for i in range(4):
        os.mkfifo(root / f"pipe{i}.jpg")
        want[str(root / f"pipe{i}.jpg")] = "not_a_regular_file"
    (root / "escape.jpg").symlink_to(outside)
    want[str(root / "escape.jpg")] = "forbidden_source"
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    want[str(root / "loop-a")] = "symlink_loop"
    want[f"{root}/../outside.jpg"] = "forbidden_source"
    want[f"file://{root}/%2e%2e/outside.jpg"] = "forbidden_source"
    want["/etc/passwd"] = "forbidden_source"
    want["/dev/zero"] = "forbidden_source"
    want[str(root / "missing.jpg")] = "file_not_found"
    want[str(root / ("n" * 300))] = "invalid_path"
    return root, want


def submit_mix(producer: Producer, want: Mapping[str, str | None], rounds: int) -> list[Event]:
    events = []
    for r in range(rounds):
        batch = [Event(item_id=f"{r}-{i}", image_uri=uri) for i, uri in enumerate(want)]
        producer.submit_many(batch)
        events += batch
    return events


def check_exactly_once(
    producer: Producer, redis_url: str, events: list[Event], want: Mapping[str, str | None], version: str
) -> list[Decision]:
    got = producer.wait([e.event_id for e in events], timeout=120)
    assert len(got) == len(events), f"{len(events) - len(got)} events undecided"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = Counter(f["event_id"] for _, f in stream_entries(client, Keys("moderation").decisions))
    assert set(stream) == {e.event_id for e in events} and max(stream.values()) == 1
    for e in events:
        d = got[e.event_id]
        reason = want[e.image_uri]
        if reason is None:
            assert d.verdict != Verdict.ERROR and d.model_version == version, (
                e.image_uri,
                d.reason,
                d.detail,
            )
            assert d.ai_score is not None
        else:
            assert d.verdict == Verdict.ERROR and d.reason == reason, (e.image_uri, d.reason, d.detail)
            assert "outside.jpg" not in (d.detail or "") and "/tmp" not in (d.detail or "")
    return list(got.values())


def test_hostile_sources_and_a_nan_model_leave_every_event_decided_once(
    reg_settings: Settings,
    registry: Registry,
    redis_url: str,
    producer: Producer,
    ckpt_a: Path,
    hostile_root: tuple[Path, dict[str, str | None]],
    tmp_path: Path,
) -> None:
    root, want = hostile_root
    good = registry.publish(ckpt_a, promote=True).version
    env = worker_env(reg_settings, redis_url, [root])
    with running_worker(redis_url, tmp_path / "w", env=env) as w:
        pid = w.pid
        events = submit_mix(producer, want, rounds=2)
        point_at(registry, write_version(registry, ckpt_a, "nan-live", weights=nan_weights(ckpt_a)))
        events += submit_mix(producer, want, rounds=2)
        check_exactly_once(producer, redis_url, events, want, good)
        time.sleep(3)  # several polls of the pointer
        assert w.proc.poll() is None and w.pid == pid
        assert w.heartbeat()["model_version"] == good
        assert w.stop() == 0  # the drain is not held up by pipes
    log = w.log()
    assert log.count('"reload_refused"') == 1 and "nan-live" in log


@pytest.mark.parametrize("registry_root", ["local"], indirect=True)  # S3: test_hostile_model covers start-up
@pytest.mark.parametrize("kind", ["nan", "unknown_arch", "pickle_weights", "traversal"])
def test_a_worker_starting_on_a_broken_current_serves_the_last_good_version(
    kind: str,
    reg_settings: Settings,
    registry: Registry,
    redis_url: str,
    producer: Producer,
    ckpt_a: Path,
    broken_versions: dict[str, Callable[[Registry, Path], str]],
    hostile_root: tuple[Path, dict[str, str | None]],
    tmp_path: Path,
) -> None:
    root, want = hostile_root
    good = registry.publish(ckpt_a, promote=True).version
    point_at(registry, broken_versions[kind](registry, ckpt_a))
    env = worker_env(reg_settings, redis_url, [root])
    with running_worker(redis_url, tmp_path / "w", env=env) as w:
        assert w.heartbeat()["model_version"] == good
        good_only = {u: r for u, r in want.items() if r is None}
        events = submit_mix(producer, good_only, rounds=1)
        check_exactly_once(producer, redis_url, events, good_only, good)
    log = w.log()
    assert '"model_fallback"' in log and log.count('"reload_refused"') == 1
