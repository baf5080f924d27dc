"""``moderation worker --processes N``: one supervisor, N real worker children sharing the queues.

The same invariant as the single-process tests (each event exactly one decision), plus what the supervisor
adds: distinct child names, signals forwarded so every child drains, fail fast when a child dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.core import images
from tests.queue.test_queue_worker import (
    _wait_until,
    assert_exactly_once,
    held,
    stream_event_ids,
    unread,
    wait_for,
)
from tests.worker_proc import running_worker, start_worker
from worker.ingress.producer import Producer
from worker.process.supervisor import ChildSpec, describe, exit_status, plan_children, spread_devices
from worker.records import Event


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    for i in range(4):
        (d / f"small{i}.jpg").write_bytes(images.jpeg(96 + 32 * i, 80 + 24 * i, seed=i))
    (d / "big.jpg").write_bytes(images.jpeg(1024, 768, seed=9))
    (d / "huge.jpg").write_bytes(images.jpeg(2048, 1536, seed=8))  # slow to decode: still held at the signal
    return d


def small_events(image_dir: Path, n: int) -> list[Event]:
    return [Event(item_id=f"s-{i}", image_uri=str(image_dir / f"small{i % 4}.jpg")) for i in range(n)]


def big_events(image_dir: Path, n: int, prefix: str, name: str = "big.jpg") -> list[Event]:
    return [Event(item_id=f"{prefix}-{i}", image_uri=str(image_dir / name)) for i in range(n)]


def log_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def supervisor_lines(text: str, event: str) -> list[dict[str, Any]]:
    return [r for r in log_lines(text) if r.get("component") == "supervisor" and r.get("event") == event]


# --- the plan, without processes -------------------------------------------------------------------------
def test_children_get_distinct_names_ports_and_round_robin_gpus() -> None:
    kids = plan_children(3, "gpu7", 9400, spread_devices("auto", 3, gpus=2))
    assert [(k.hostname, k.metrics_port, k.device) for k in kids] == [
        ("gpu7-0", 9400, "cuda:0"),
        ("gpu7-1", 9401, "cuda:1"),
        ("gpu7-2", 9402, "cuda:0"),
    ]
    argv = kids[1].argv(["--max-batch", "128"])
    assert argv[:6] == [sys.executable, "-m", "worker", "worker", "--processes", "1"]
    assert argv[6:] == [
        "--max-batch",
        "128",
        "--hostname",
        "gpu7-1",
        "--metrics-port",
        "9401",
        "--device",
        "cuda:1",
    ]
    assert [k.metrics_port for k in plan_children(2, "h", None, [None, None])] == [None, None]


@pytest.mark.parametrize(
    ("device", "gpus", "want"),
    [
        ("auto", 1, [None, None]),
        ("cuda", 0, [None, None]),
        ("cuda:1", 4, [None, None]),
        ("cpu", 4, [None, None]),
    ],
)
def test_an_explicit_device_or_a_single_gpu_is_left_alone(device: str, gpus: int, want: list[None]) -> None:
    assert spread_devices(device, 2, gpus) == want


def test_child_status_as_the_shell_reports_it() -> None:
    assert (exit_status(-9), describe(-9)) == (137, "killed by SIGKILL")
    assert (exit_status(2), describe(2)) == (2, "exit code 2")
    assert ChildSpec("h").argv([])[-2:] == ["--hostname", "h"]


def test_help_explains_processes_and_metrics_ports() -> None:
    out = run_cli("worker", "--help", timeout=60, COLUMNS="200")
    assert out.returncode == 0, out.stderr
    assert "--processes" in out.stdout and "METRICS_PORT+i" in out.stdout


# --- real processes -------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_two_processes_share_the_queue_and_sigterm_drains_both(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path
) -> None:
    # Each child holds at most 16 events and scores 4 per model call: both must take part, and 32 slow
    # events are all held by the children (none left queued) while several calls are still to run.
    env = {"MODERATION_PREFETCH": "16", "MODERATION_MAX_BATCH": "4"}
    sup = start_worker(redis_url, tmp_path, tiny_checkpoint, env=env, args=["--processes", "2"])
    kids = sup.children(2)
    try:
        sup.wait_ready(timeout=180, hostnames=kids)
        pids = {h: int(sup.heartbeat(h)["pid"]) for h in kids}
        assert len(set(pids.values())) == 2 and sup.pid not in pids.values()
        small = small_events(image_dir, 200)
        producer.submit_many(small)
        got = wait_for(producer, small, 120)
        by_child = Counter(str(d.batch_id).rsplit(":", 1)[0] for d in got.values())
        assert set(by_child) == set(kids), by_child
        assert_exactly_once(redis_url, small)

        big = big_events(image_dir, 32, "t", name="huge.jpg")
        producer.submit_many(big)
        _wait_until(lambda: unread(redis_url) == 0, 60)  # all read: the children hold them
        in_flight = len(small) + len(big) - len(stream_event_ids(redis_url))
        assert sup.stop(signal.SIGTERM) == 0, sup.log()[-4000:]
    finally:
        if sup.proc.poll() is None:
            sup.kill()
    log = sup.log()
    assert supervisor_lines(log, "supervisor_draining")
    exited = {r["hostname"]: r["exit_code"] for r in supervisor_lines(log, "child_exited")}
    assert exited == dict.fromkeys(kids, 0)
    assert supervisor_lines(log, "supervisor_exited")[-1]["exit_code"] == 0
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    # Both children drained: everything they held was decided (once) and acked, nothing waits for redelivery.
    assert in_flight > 0, "everything was decided before the signal"
    assert_exactly_once(redis_url, small + big)
    assert held(redis_url) == 0 and unread(redis_url) == 0


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_a_child_killed_stops_the_unit_non_zero_and_a_restart_decides_each_event_once(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path
) -> None:
    fast = {
        "MODERATION_VISIBILITY_TIMEOUT_S": "20",  # also the supervisor's bound on the survivor's drain
        "MODERATION_RECLAIM_INTERVAL_S": "0.5",
        "MODERATION_PREFETCH": "4",  # the survivor's drain must fit in the supervisor's bound above
    }
    sup = start_worker(redis_url, tmp_path, tiny_checkpoint, env={**fast, "MODERATION_WORKER_PROCESSES": "2"})
    victim, survivor = sup.children(2)
    big = big_events(image_dir, 120, "k")
    try:
        sup.wait_ready(timeout=180, hostnames=[victim, survivor])
        producer.submit_many(big)
        _wait_until(lambda: len(stream_event_ids(redis_url)) >= 20, 120)
        os.kill(int(sup.heartbeat(victim)["pid"]), signal.SIGKILL)
        assert sup.proc.wait(90) == 128 + signal.SIGKILL
    finally:
        if sup.proc.poll() is None:
            sup.kill()
    log = sup.log()
    [failure] = supervisor_lines(log, "child_exited_unexpectedly")
    assert (failure["hostname"], failure["exit_code"]) == (victim, -signal.SIGKILL)
    assert [(r["hostname"], r["exit_code"]) for r in supervisor_lines(log, "child_exited")] == [(survivor, 0)]
    final = supervisor_lines(log, "supervisor_exited")[-1]
    assert final["failed_child"] == victim and "SIGKILL" in final["reason"]
    assert len(stream_event_ids(redis_url)) < len(big), "the unit finished everything before the kill"
    with running_worker(redis_url, tmp_path, tiny_checkpoint, env=fast):
        wait_for(producer, big, 180)
    assert_exactly_once(redis_url, big)
    assert not producer.store.dead_letters()
