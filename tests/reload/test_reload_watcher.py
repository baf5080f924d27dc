"""ModelWatcher without a queue: a real registry (disk or moto S3), a real Redis, real tiny models.

The batcher's contract is "call current() once per batch"; these tests do exactly that in a loop while
versions are promoted, corrupted and rolled back, and check what every batch was scored with.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.core.images import jpeg
from tests.waiting import eventually
from worker.errors import CheckpointError
from worker.keys import Keys
from worker.lifecycle.registry import Registry
from worker.lifecycle.reload import ModelWatcher, notify
from worker.lifecycle.shadow import report
from worker.media.fetch import Fetcher
from worker.ops.metrics import Metrics
from worker.records import Event
from worker.scoring.checkpoint import read_manifest
from worker.scoring.scorer import Scorer, prepare_or_error, score_events
from worker.settings import Settings


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(6):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(jpeg(96 + 8 * i, 80, seed=i))
        out.append(p)
    return out


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def wait_for(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    eventually(pred, "the condition", timeout, interval=0.02)


def failures(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("moderation_reload_failures_total", {"reason": reason}) or 0.0


def reloads(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("moderation_reloads_total") or 0.0


def events_for(images: list[Path]) -> list[Event]:
    return [Event(item_id=p.name, image_uri=str(p)) for p in images]


def test_notification_swaps_between_batches_while_batches_keep_running(
    reg_settings: Settings,
    registry: Registry,
    client: redis.Redis,
    ckpt_a: Path,
    ckpt_b: Path,
    images: list[Path],
) -> None:
    a = registry.publish(ckpt_a, promote=True).version
    b = registry.publish(ckpt_b).version
    # Polling far slower than the test: only the pub/sub notification can make the swap this quick.
    settings = reg_settings.model_copy(update={"reload_poll_s": 120.0})
    metrics = Metrics()
    fetcher = Fetcher(settings)
    seen: list[str] = []
    stop = threading.Event()
    batches_errors: list[BaseException] = []

    with ModelWatcher(settings, metrics, client) as watcher:
        assert watcher.version == a

        def batches() -> None:
            try:
                while not stop.is_set():
                    scorer = watcher.current()  # once per batch, as the batcher does
                    decisions = score_events(events_for(images), scorer, fetcher, threads=1)
                    assert {d.model_version for d in decisions} == {scorer.version}
                    assert all(d.verdict.value != "error" for d in decisions)
                    seen.append(scorer.version)
            except BaseException as exc:
                batches_errors.append(exc)

        t = threading.Thread(target=batches)
        t.start()
        wait_for(lambda: len(seen) >= 2)
        registry.promote(b, by="test")
        assert notify(client, settings.namespace, "promote", b, "test")
        wait_for(lambda: watcher.version == b, timeout=20)
        n = len(seen)
        wait_for(lambda: len(seen) >= n + 2)
        stop.set()
        t.join(30)

    assert not batches_errors
    first_b = seen.index(b)
    assert set(seen[:first_b]) == {a} and set(seen[first_b:]) == {b}  # one switch, never back
    assert reloads(metrics) == 1
    assert (
        metrics.registry.get_sample_value(
            "moderation_model_info",
            {"version": b, "arch": "test_convnext", "crop_size": "64", "source": "registry"},
        )
        == 1.0
    )


def test_polling_alone_finds_a_new_version(
    reg_settings: Settings, registry: Registry, ckpt_a: Path, ckpt_b: Path
) -> None:
    a = registry.publish(ckpt_a, promote=True).version
    b = registry.publish(ckpt_b).version
    with ModelWatcher(reg_settings, Metrics(), redis_client=None) as watcher:  # no Redis at all
        assert watcher.current().version == a
        registry.promote(b)
        wait_for(lambda: watcher.current().version == b)


def test_corrupted_weights_are_refused_once_and_the_old_model_keeps_serving(
    reg_settings: Settings,
    registry: Registry,
    client: redis.Redis,
    ckpt_a: Path,
    ckpt_c: Path,
    corrupt: Callable[[Registry, Settings, str], None],
) -> None:
    a = registry.publish(ckpt_a, promote=True).version
    c = registry.publish(ckpt_c).version
    corrupt(registry, reg_settings, c)
    metrics = Metrics()
    watcher = ModelWatcher(reg_settings, metrics, client).start(background=False)
    registry.promote(c)
    assert watcher.check_now() == a
    assert watcher.check_now() == a  # remembered: not downloaded and checked again
    assert failures(metrics, "checksum") == 1 and reloads(metrics) == 0
    assert "sha256" in watcher.refused[c]
    refused = json.loads(client.hget(Keys(reg_settings.namespace).model_refused, c) or b"{}")
    assert refused["reason"] == "checksum" and refused["worker"]
    assert watcher.current().version == a


def test_golden_score_mismatch_is_refused(
    reg_settings: Settings,
    registry: Registry,
    ckpt_a: Path,
    ckpt_bad_golden: Path,
    ckpt_b: Path,
) -> None:
    a = registry.publish(ckpt_a, promote=True).version
    bad = registry.publish(ckpt_bad_golden, promote=True).version  # checksum is fine: publish accepts it
    metrics = Metrics()
    with ModelWatcher(reg_settings, metrics) as watcher:
        # Start-up with a broken current: the last good version from the history serves instead.
        assert watcher.version == a
        assert failures(metrics, "golden") == 1 and "golden" in watcher.refused[bad]
        # A good version promoted afterwards is still followed.
        b = registry.publish(ckpt_b, promote=True).version
        wait_for(lambda: watcher.version == b)
        registry.promote(bad)
        time.sleep(4 * reg_settings.reload_poll_s)
        assert watcher.version == b and failures(metrics, "golden") == 1


def test_rollback_is_followed(reg_settings: Settings, registry: Registry, ckpt_a: Path, ckpt_b: Path) -> None:
    a = registry.publish(ckpt_a, promote=True).version
    b = registry.publish(ckpt_b, promote=True).version
    watcher = ModelWatcher(reg_settings, Metrics()).start(background=False)
    assert watcher.version == b
    registry.rollback()
    assert watcher.check_now() == a


def test_a_pinned_checkpoint_is_not_followed(
    reg_settings: Settings, registry: Registry, ckpt_a: Path, ckpt_b: Path
) -> None:
    registry.publish(ckpt_a, promote=True)
    b = registry.publish(ckpt_b).version
    pinned = reg_settings.model_copy(update={"checkpoint": str(ckpt_a)})
    watcher = ModelWatcher(pinned, Metrics()).start(background=False)
    registry.promote(b)
    assert watcher.check_now() == read_manifest(ckpt_a).version


def test_an_empty_registry_is_a_clear_error(reg_settings: Settings) -> None:
    with pytest.raises(CheckpointError, match="no current version"):
        ModelWatcher(reg_settings, Metrics()).start(background=False)


def _observe_batches(watcher: ModelWatcher, images: list[Path], settings: Settings, n: int) -> list[float]:
    """Run ``n`` live batches through ``observe`` and return the live scores."""
    fetcher = Fetcher(settings)
    scores: list[float] = []
    for i in range(n):
        scorer = watcher.current()
        events = events_for(images[i % 2 :: 2])
        items = [(e, prepare_or_error(e.image_uri, fetcher, scorer.spec)) for e in events]
        decisions = scorer.score_prepared(items)
        watcher.observe(items, decisions, 0.01)
        scores += [d.ai_score for d in decisions if d.ai_score is not None]
    watcher.flush_shadow()
    return scores


@pytest.mark.parametrize("registry_root", ["local"], indirect=True)
def test_shadow_of_identical_weights_agrees_fully(
    reg_settings: Settings,
    registry: Registry,
    client: redis.Redis,
    ckpt_a: Path,
    ckpt_a_twin: Path,
    images: list[Path],
) -> None:
    registry.publish(ckpt_a, promote=True)
    twin = registry.publish(ckpt_a_twin).version
    keys = Keys(reg_settings.namespace)
    with ModelWatcher(reg_settings, Metrics(), client) as watcher:
        _observe_batches(watcher, images, reg_settings, 2)  # no shadow yet: nothing recorded
        assert report(client, keys.shadow_stats(twin), twin) is None
        client.set(keys.shadow, twin)
        watcher.check_now()
        assert watcher.shadow_version == twin and watcher.version != twin
        _observe_batches(watcher, images, reg_settings, 4)
        rep = report(client, keys.shadow_stats(twin), twin)
        assert rep is not None
        assert rep.events == len(images) * 2 and rep.batches == 4
        assert rep.agreement == 1.0 and rep.mean_abs_diff == pytest.approx(0.0, abs=1e-6)
        assert rep.p95_abs_diff is not None and rep.p95_abs_diff <= 0.001
        assert rep.latency_ratio is not None and rep.latency_ratio > 0
        # Promoting the shadowed version serves the copy already loaded and validated; shadowing stops.
        shadow_scorer = watcher._shadow
        registry.promote(twin)
        watcher.check_now()
        assert watcher.version == twin and watcher.shadow_version is None
        assert watcher.current() is shadow_scorer


@pytest.mark.parametrize("registry_root", ["local"], indirect=True)
def test_shadow_report_matches_scores_computed_independently(
    reg_settings: Settings,
    registry: Registry,
    client: redis.Redis,
    ckpt_a: Path,
    ckpt_b: Path,
    images: list[Path],
) -> None:
    registry.publish(ckpt_a, promote=True)
    b = registry.publish(ckpt_b).version
    keys = Keys(reg_settings.namespace)
    client.set(keys.shadow, b)
    with ModelWatcher(reg_settings, Metrics(), client) as watcher:
        assert watcher.shadow_version == b
        live = _observe_batches(watcher, images, reg_settings, 2)
        client.delete(keys.shadow)
        watcher.check_now()
        assert watcher.shadow_version is None
        _observe_batches(watcher, images, reg_settings, 1)  # shadow off: not counted

    fetcher = Fetcher(reg_settings)
    other = score_events(events_for(images), Scorer.load(str(ckpt_b), reg_settings), fetcher)
    by_item = {d.item_id: d.ai_score for d in other}
    ordered = [by_item[e.item_id] for i in range(2) for e in events_for(images[i::2])]
    diffs = [abs(x - y) for x, y in zip(live, ordered, strict=True)]
    rep = report(client, keys.shadow_stats(b), b)
    assert rep is not None and rep.events == len(images)
    assert rep.mean_abs_diff == pytest.approx(sum(diffs) / len(diffs), abs=1e-6)
    assert rep.max_abs_diff == pytest.approx(max(diffs), abs=1e-3)


@pytest.mark.parametrize("registry_root", ["s3"], indirect=True)
def test_an_unreachable_version_is_retried_not_refused_for_good(
    reg_settings: Settings,
    registry: Registry,
    ckpt_a: Path,
    ckpt_b: Path,
) -> None:
    a = registry.publish(ckpt_a, promote=True).version
    b = registry.publish(ckpt_b).version
    key = f"versions/{b}/model.safetensors"
    weights = registry.store.read(key)
    assert weights is not None
    store = registry.store
    store.client.delete_object(Bucket=store.loc.bucket, Key=store.loc.join(key).key)  # type: ignore[attr-defined]
    metrics = Metrics()
    watcher = ModelWatcher(reg_settings, metrics).start(background=False)
    registry.promote(b)
    assert watcher.check_now() == a
    assert failures(metrics, "unreadable") == 1 and b not in watcher.refused
    assert watcher.check_now() == a and failures(metrics, "unreadable") == 1  # backing off, not looping
    store.write(key, weights)  # the object store is back
    watcher.retry_transient_s = 0.0  # as if the back-off (30 s) had passed
    assert watcher.check_now() == b
