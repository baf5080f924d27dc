"""Hot reload through a real ``moderation worker`` process under continuous load.

Events flow the whole time a version is promoted, refused or rolled back. Every test checks: each event has
exactly one decision, none is an error, the worker process never restarted, and, ordered by the worker's
batch counter, the model versions change only between batches and only in the expected order.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from tests.core import images
from tests.streams import stream_entries
from tests.waiting import eventually
from tests.worker_proc import WorkerProc, running_worker
from worker.cli.main import app
from worker.ingress.producer import Producer
from worker.keys import Keys
from worker.lifecycle.registry import Registry
from worker.records import Decision, Event, Verdict
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


class Load:
    """Submits a few events every ``period`` seconds from a thread until stopped."""

    def __init__(self, producer: Producer, image_dir: Path, per_tick: int = 3, period: float = 0.05) -> None:
        self.producer = producer
        self.paths = sorted(image_dir.glob("*.jpg"))
        self.per_tick = per_tick
        self.period = period
        self.events: list[Event] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            i = 0
            while not self._stop.is_set():
                batch = [
                    Event(item_id=f"load-{i + k}", image_uri=str(self.paths[(i + k) % len(self.paths)]))
                    for k in range(self.per_tick)
                ]
                i += self.per_tick
                self.producer.submit_many(batch)
                self.events.extend(batch)
                time.sleep(self.period)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def decided(self) -> dict[str, Decision]:
        return self.producer.decisions([e.event_id for e in list(self.events)])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("reload-imgs")
    for i in range(5):
        (d / f"img{i}.jpg").write_bytes(images.jpeg(96 + 24 * i, 80 + 16 * i, seed=i))
    return d


def cli(*args: str, env: dict[str, str]) -> str:
    out = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **env})
    assert out.exit_code == 0, out.output
    return out.output


def worker_env(settings: Settings) -> dict[str, str]:
    env = {"MODERATION_REGISTRY": settings.default_registry, "MODERATION_RELOAD_POLL_S": "2"}
    if settings.s3_endpoint_url:
        env["MODERATION_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def wait_until(pred: Callable[[], bool], timeout: float, what: str, w: WorkerProc) -> None:
    """``eventually``, with the worker's log tail when it times out."""
    try:
        eventually(pred, what, timeout, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{w.log()[-3000:]}") from None


def decided_with(load: Load, version: str, at_least: int) -> Callable[[], bool]:
    return lambda: sum(d.model_version == version for d in load.decided().values()) >= at_least


def finish(load: Load, producer: Producer, redis_url: str) -> list[Decision]:
    """All decisions of the run, checked for exactly-once and no errors, in the worker's batch order."""
    assert load.error is None, load.error
    got = producer.wait([e.event_id for e in load.events], timeout=60)
    missing = len(load.events) - len(got)
    assert missing == 0, f"{missing} of {len(load.events)} events undecided"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = Counter(f["event_id"] for _, f in stream_entries(client, Keys("moderation").decisions))
    assert set(stream) == {e.event_id for e in load.events} and max(stream.values()) == 1
    errors = [d for d in got.values() if d.verdict == Verdict.ERROR]
    assert not errors, [(d.reason, d.detail) for d in errors[:3]]
    return sorted(got.values(), key=lambda d: int((d.batch_id or "x:-1").rsplit(":", 1)[1]))


def runs(decisions: list[Decision]) -> list[str]:
    """Model versions in batch order with repeats collapsed: [a, b, a] means a, then b, then a again."""
    out: list[str] = []
    for d in decisions:
        assert d.model_version is not None
        if not out or out[-1] != d.model_version:
            out.append(d.model_version)
    return out


@pytest.fixture
def fleet(
    registry: Registry, reg_settings: Settings, redis_url: str, tmp_path: Path
) -> Iterator[tuple[Producer, dict[str, str]]]:
    producer = Producer(Settings(redis_url=redis_url, home=tmp_path / "producer"))
    yield producer, {**worker_env(reg_settings), "REDIS_URL": redis_url}
    producer.close()


def test_shadow_then_promote_then_rollback_under_load_without_restart(
    fleet: tuple[Producer, dict[str, str]],
    registry: Registry,
    redis_url: str,
    ckpt_a: Path,
    ckpt_b: Path,
    image_dir: Path,
    tmp_path: Path,
) -> None:
    producer, env = fleet
    a = registry.publish(ckpt_a, promote=True).version
    b = registry.publish(ckpt_b).version
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with running_worker(redis_url, tmp_path / "w", env=env) as w, Load(producer, image_dir) as load:
        pid = w.pid
        assert w.heartbeat()["model_version"] == a
        wait_until(decided_with(load, a, 20), 60, "decisions by a", w)

        # Shadow mode first: b scores live batches next to a, deciding nothing.
        cli("shadow", "start", b, env=env)
        stats = Keys("moderation").shadow_stats(b)
        wait_until(lambda: int(client.hget(stats, "events") or 0) >= 20, 30, "shadow statistics", w)
        report = json.loads(cli("shadow", "report", "--json", env=env))
        assert report["version"] == b and 0.0 <= report["agreement"] <= 1.0 and report["latency_ratio"] > 0
        cli("shadow", "stop", env=env)
        assert all(d.model_version == a for d in load.decided().values())  # the shadow decided nothing

        cli("promote", b, env=env)  # the user's command: flips the pointer, notifies the worker
        wait_until(lambda: w.heartbeat().get("model_version") == b, 30, "swap to b", w)
        wait_until(decided_with(load, b, 20), 60, "decisions by b", w)

        cli("rollback", env=env)
        wait_until(lambda: w.heartbeat().get("model_version") == a, 30, "rollback to a", w)
        n_a = sum(d.model_version == a for d in load.decided().values())
        wait_until(decided_with(load, a, n_a + 20), 60, "decisions by a again", w)
        assert w.proc.poll() is None and w.pid == pid and w.heartbeat()["pid"] == str(pid)
    decisions = finish(load, producer, redis_url)
    assert runs(decisions) == [a, b, a]  # each swap fell between two batches, none went back and forth
    assert w.proc.returncode == 0
    log = w.log()
    assert log.count('"reloaded"') == 2


def test_corrupted_and_mismatched_versions_are_refused_under_load(
    fleet: tuple[Producer, dict[str, str]],
    registry: Registry,
    reg_settings: Settings,
    redis_url: str,
    ckpt_a: Path,
    ckpt_c: Path,
    ckpt_bad_golden: Path,
    image_dir: Path,
    tmp_path: Path,
    corrupt: Callable[[Registry, Settings, str], None],
) -> None:
    producer, env = fleet
    a = registry.publish(ckpt_a, promote=True).version
    c = registry.publish(ckpt_c).version
    corrupt(registry, reg_settings, c)  # weights bytes changed after publishing
    bad = registry.publish(ckpt_bad_golden).version  # golden scores the weights do not reproduce
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    refused_key = Keys("moderation").model_refused
    with running_worker(redis_url, tmp_path / "w", env=env) as w, Load(producer, image_dir) as load:
        pid = w.pid
        wait_until(decided_with(load, a, 10), 60, "decisions by a", w)
        for version, reason in ((c, "checksum"), (bad, "golden")):
            cli("promote", version, env=env)

            def refused(v: str = version) -> bool:
                return bool(client.hexists(refused_key, v))

            wait_until(refused, 30, f"refusal of {version}", w)
            assert json.loads(client.hget(refused_key, version) or "{}")["reason"] == reason
            n = len(load.decided())

            def moved_on(before: int = n) -> bool:
                return len(load.decided()) >= before + 15

            wait_until(moved_on, 60, "decisions after the refusal", w)
            assert w.heartbeat()["model_version"] == a
        assert w.proc.poll() is None and w.pid == pid
    decisions = finish(load, producer, redis_url)
    assert runs(decisions) == [a]
    log = w.log()
    assert '"reload_refused"' in log and '"reason": "checksum"' in log and '"reason": "golden"' in log
    assert '"reloaded"' not in log
    models = json.loads(cli("models", "--json", env=env))
    assert {r["version"]: (r["refused"] or {}).get("reason") for r in models} == {
        a: None,
        c: "checksum",
        bad: "golden",
    }
