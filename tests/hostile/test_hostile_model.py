"""Broken models published to a real registry (disk and moto S3) are refused once and never serve.

A NaN model, inverted thresholds, an unknown architecture, weights that are not safetensors, an absurd crop
size, traversal weight names: each is refused by a running watcher exactly once (not re-checked at every
poll), the good version keeps serving, and a watcher that starts while one is current falls back to the last
good version with a log line and a metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
import structlog

from tests.core.images import jpeg
from tests.hostile.conftest import nan_weights, point_at, write_version
from worker.errors import CheckpointError, ErrorReason
from worker.keys import Keys
from worker.lifecycle.registry import Registry
from worker.lifecycle.reload import ModelWatcher
from worker.media.fetch import Fetcher
from worker.ops.metrics import Metrics
from worker.records import Event, Thresholds, Verdict
from worker.scoring.checkpoint import Manifest, check_golden, load_checkpoint, read_manifest
from worker.scoring.policy import verdict_for
from worker.scoring.scorer import Scorer, score_events
from worker.settings import Settings

BROKEN = [
    "nan",
    "inverted",
    "out_of_range",
    "unknown_arch",
    "pickle_weights",
    "garbage_weights",
    "huge_crop",
    "nan_golden",
    "traversal",
    "absolute",
]


def refusals(metrics: Metrics) -> float:
    return sum(
        s.value
        for fam in metrics.registry.collect()
        if fam.name == "moderation_reload_failures"
        for s in fam.samples
        if s.name.endswith("_total")
    )


def fallbacks(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("moderation_model_fallbacks_total") or 0.0


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_version_is_refused_once_and_the_good_one_keeps_serving(
    kind: str,
    reg_settings: Settings,
    registry: Registry,
    redis_url: str,
    ckpt_a: Path,
    broken_versions: dict[str, Callable[[Registry, Path], str]],
) -> None:
    good = registry.publish(ckpt_a, promote=True).version
    bad = broken_versions[kind](registry, ckpt_a)
    client = redis.Redis.from_url(redis_url)
    metrics = Metrics()
    watcher = ModelWatcher(reg_settings, metrics, client).start(background=False)
    point_at(registry, bad)
    for _ in range(3):  # three polls: one refusal
        assert watcher.check_now() == good
    assert refusals(metrics) == 1
    assert bad in watcher.refused
    record = json.loads(client.hget(Keys(reg_settings.namespace).model_refused, bad) or b"{}")
    assert record["reason"] and record["worker"]


@pytest.mark.parametrize("kind", BROKEN)
def test_a_worker_starting_on_a_broken_current_falls_back_loudly(
    kind: str,
    reg_settings: Settings,
    registry: Registry,
    ckpt_a: Path,
    broken_versions: dict[str, Callable[[Registry, Path], str]],
) -> None:
    good = registry.publish(ckpt_a, promote=True).version
    point_at(registry, broken_versions[kind](registry, ckpt_a))
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        watcher = ModelWatcher(reg_settings, metrics).start(background=False)
    assert watcher.version == good
    assert fallbacks(metrics) == 1
    line = next(e for e in logs if e["event"] == "model_fallback")
    assert line["log_level"] == "error" and line["model_version"] == good
    assert watcher.check_now() == good and refusals(metrics) == 1  # not retried at the next poll


def test_nothing_to_fall_back_to_is_a_clear_error(
    reg_settings: Settings, registry: Registry, ckpt_a: Path
) -> None:
    point_at(registry, write_version(registry, ckpt_a, "nan-only", weights=nan_weights(ckpt_a)))
    with pytest.raises(CheckpointError, match="passes validation"):
        ModelWatcher(reg_settings, Metrics()).start(background=False)


@pytest.mark.parametrize("registry_root", ["local"], indirect=True)
@pytest.mark.parametrize(
    "name", ["../../evil.safetensors", "/etc/evil.safetensors", "a/b.safetensors", "x.pt"]
)
def test_traversal_weight_names_touch_nothing_outside_the_version(
    name: str, reg_settings: Settings, registry: Registry, ckpt_a: Path, tmp_path: Path
) -> None:
    registry.publish(ckpt_a, promote=True)
    bad = write_version(registry, ckpt_a, "evil", manifest_edit=lambda m: m.update(weights_file=name))
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(registry.uri_for(bad), reg_settings)
    assert not (Path(registry.root).parent / "evil.safetensors").exists()


def test_traversal_weight_names_are_not_downloaded_from_s3(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, ckpt_a: Path
) -> None:
    """An s3:// manifest whose weights name climbs out of the cache must not write there."""
    from worker.lifecycle.registry import open_registry

    settings = Settings(home=tmp_path / "home", device="cpu", s3_endpoint_url=s3_endpoint)
    registry = open_registry(settings, f"s3://{s3_bucket}/models")
    registry.publish(ckpt_a)
    registry.store.write("versions/evil/x", b"weights")
    bad = write_version(
        registry, ckpt_a, "evil", manifest_edit=lambda m: m.update(weights_file="../../../../escaped")
    )
    with pytest.raises(CheckpointError):
        load_checkpoint(registry.uri_for(bad), settings)
    assert not list(tmp_path.rglob("escaped"))


def test_version_names_from_a_hand_written_pointer_cannot_climb(
    reg_settings: Settings, registry: Registry, ckpt_a: Path
) -> None:
    good = registry.publish(ckpt_a, promote=True).version
    watcher = ModelWatcher(reg_settings, Metrics()).start(background=False)
    registry.store.write(
        "current.json",
        json.dumps(
            {"version": "../../x", "promoted_at": "2026-12-01T00:00:00Z", "promoted_by": "t", "history": []}
        ).encode(),
    )
    assert watcher.check_now() == good
    with pytest.raises(CheckpointError, match="plain name"):
        registry.uri_for("../../x")


def test_thresholds_must_be_ordered_and_in_range() -> None:
    Thresholds(review=0.5, block=0.5)
    for bad in ({"review": 0.9, "block": 0.5}, {"review": -0.1}, {"block": 1.5}, {"review": math.nan}):
        with pytest.raises(ValueError):
            Thresholds(**bad)
    with pytest.raises(ValueError):
        verdict_for(math.nan, Thresholds())


def test_manifest_bounds(ckpt_a: Path) -> None:
    raw = json.loads((ckpt_a / "manifest.json").read_text())
    for field, value in [("crop_size", 4), ("crop_size", 4096), ("num_crops", 1000), ("std", [0, 1, 1])]:
        with pytest.raises(ValueError):
            Manifest.model_validate({**raw, field: value})


def test_golden_check_refuses_nan_even_when_the_manifest_has_no_nan(tmp_path: Path, ckpt_a: Path) -> None:
    from worker.scoring.checkpoint import sha256_file

    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(nan_weights(ckpt_a))
    manifest = json.loads((ckpt_a / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_file(bad / "model.safetensors")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    ckpt = load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="non-finite"):
        check_golden(ckpt)


def test_a_live_non_finite_score_is_an_error_decision_never_allow(
    tmp_path: Path, ckpt_a: Path, settings: Settings
) -> None:
    """Even a model that slipped past validation (pinned, unvalidated) cannot allow with NaN."""
    from worker.scoring.checkpoint import sha256_file

    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(nan_weights(ckpt_a))
    manifest = json.loads((ckpt_a / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_file(bad / "model.safetensors")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    settings = settings.model_copy(update={"local_roots": [str(tmp_path)]})
    scorer = Scorer.load(str(bad), settings, validate=False)
    assert read_manifest(bad).version == scorer.version
    events = []
    for i in range(4):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(jpeg(80, 72, seed=i))
        events.append(Event(item_id=str(i), image_uri=str(p)))
    decisions = score_events(events, scorer, Fetcher(settings))
    assert [d.verdict for d in decisions] == [Verdict.ERROR] * 4
    assert {d.reason for d in decisions} == {ErrorReason.MODEL_OUTPUT_INVALID}
    assert all(d.ai_score is None for d in decisions)
    assert not np.isnan([c.ai_score for d in decisions for c in d.crops]).any()
