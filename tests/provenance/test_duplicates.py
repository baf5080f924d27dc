"""Near-duplicate reuse with real Redis, real re-encoded copies and a tiny real timm model."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from worker.delivery.store import DecisionStore
from worker.media.decode import decode_image
from worker.media.fetch import Fetcher
from worker.media.provenance import EvidenceMetrics
from worker.records import Decision, Event, Provenance, Thresholds, Verdict
from worker.samples import sample_paths
from worker.scoring.checkpoint import init_checkpoint
from worker.scoring.duplicates import DuplicateIndex, distance, pdq_hash, pdq_hash_image, propagate_override
from worker.scoring.scorer import Scorer, score_events
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def copy_of(data: bytes, scale: float = 0.8, quality: int = 70) -> bytes:
    """What a platform makes of a re-upload: resized and re-encoded."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    out = io.BytesIO()
    img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC).save(
        out, "JPEG", quality=quality
    )
    return out.getvalue()


def sample(name: str) -> bytes:
    return next(p for p in sample_paths() if p.name.startswith(name)).read_bytes()


# Two Stable Diffusion generations at 512x512: the overridden image and an unrelated one of the same kind.
ORIGINAL, UNRELATED = "comfyui__hypernetworks", "comfyui__sdturbo"


def hash_of(data: bytes) -> str:
    found = pdq_hash(data)
    assert found is not None
    return found[0]


def test_copies_are_near_and_unrelated_images_far() -> None:
    threshold = Settings().duplicate_threshold
    for path in sample_paths():
        data = path.read_bytes()
        assert distance(hash_of(data), hash_of(copy_of(data))) <= threshold, path.name
    assert distance(hash_of(sample(ORIGINAL)), hash_of(sample(UNRELATED))) > threshold
    # The CPU path hashes the pixels it decoded, the device path the bytes: one file, (nearly) one hash.
    for path in sample_paths():
        data = path.read_bytes()
        decoded = pdq_hash_image(decode_image(data, max_pixels=10**8, allowed_formats=["JPEG"]))
        assert decoded is not None and distance(hash_of(data), decoded[0]) <= 8, path.name
    # Two halves of one photograph: the same scene, lighting and camera, still different images.
    img = Image.open(io.BytesIO(sample("skimage__rocket"))).convert("RGB")
    w, h = img.size
    halves = []
    for box in ((0, 0, w // 2, h), (w // 2, 0, w, h)):
        buf = io.BytesIO()
        img.crop(box).save(buf, "JPEG", quality=90)
        halves.append(hash_of(buf.getvalue()))
    assert distance(*halves) > threshold


def test_flat_images_get_no_hash() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (120, 130, 140)).save(buf, "PNG")
    assert pdq_hash(buf.getvalue()) is None


def _settings(tmp_path: Path, redis_url: str, **kw: Any) -> Settings:
    return Settings(home=tmp_path / "home", device="cpu", redis_url=redis_url, **kw)


def _events(tmp_path: Path, files: dict[str, bytes]) -> list[Event]:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [Event(item_id=name, image_uri=str(tmp_path / name)) for name in files]


def test_copy_of_an_overridden_image_inherits_the_override(
    tmp_path: Path, tiny_checkpoint: Path, redis_url: str, no_network: list[Any]
) -> None:
    settings = _settings(tmp_path, redis_url)
    store, index = DecisionStore.from_url(redis_url), DuplicateIndex.from_url(redis_url, settings)
    scorer, fetcher = Scorer.load(str(tiny_checkpoint), settings), Fetcher(settings)

    (original,) = score_events(
        _events(tmp_path, {"orig.jpg": sample(ORIGINAL)}), scorer, fetcher, duplicates=index
    )
    assert original.source == "model"
    assert store.write(original)
    assert index.remember_decisions([original]) == 1
    overridden = store.override(original.event_id, Verdict.BLOCK, "alice", "seen it before")
    propagate_override(store, overridden, settings, index)

    files = {"copy.jpg": copy_of(sample(ORIGINAL)), "other.jpg": sample(UNRELATED)}
    copy, other = score_events(_events(tmp_path, files), scorer, fetcher, duplicates=index)
    assert copy.source == "duplicate"
    assert copy.verdict == Verdict.BLOCK
    assert copy.matched_event is not None
    assert copy.matched_event.event_id == original.event_id
    assert copy.matched_event.source == "moderator:alice"
    assert 0 <= copy.matched_event.distance <= settings.duplicate_threshold
    assert "model" not in copy.timings_ms  # decided without the model
    assert other.source == "model" and other.matched_event is None
    assert no_network == []
    registry = CollectorRegistry()
    EvidenceMetrics(registry).observe([copy, other])
    assert registry.get_sample_value("moderation_duplicate_reuses_total", {"matched": "moderator"}) == 1

    # Another worker process (its own mirror of the index) matches the same copy.
    fresh = DuplicateIndex.from_url(redis_url, settings)
    assert copy.provenance is not None and copy.provenance.pdq is not None
    match = fresh.lookup(copy.provenance.pdq)
    assert match is not None and match.event_id == original.event_id and match.by_moderator


def test_override_propagates_to_copies_waiting_for_review(tmp_path: Path, redis_url: str) -> None:
    ckpt = tmp_path / "all-review"
    init_checkpoint("test_convnext", ckpt, crop_size=64, thresholds=Thresholds(review=0.0, block=1.0), seed=2)
    settings = _settings(tmp_path, redis_url)
    store, index = DecisionStore.from_url(redis_url), DuplicateIndex.from_url(redis_url, settings)
    scorer = Scorer.load(str(ckpt), settings)
    files = {
        "orig.jpg": sample(ORIGINAL),
        "copy.jpg": copy_of(sample(ORIGINAL)),
        "copy2.jpg": copy_of(copy_of(sample(ORIGINAL), 0.9, 85)),
        "other.jpg": sample(UNRELATED),
    }
    decisions = score_events(
        _events(tmp_path, files), scorer, Fetcher(settings)
    )  # arrived before any verdict
    assert [d.verdict for d in decisions] == [Verdict.REVIEW] * 4
    store.write_many(decisions)
    orig, copy, copy2, other = decisions

    overridden = store.override(orig.event_id, Verdict.ALLOW, "bob")
    propagated = propagate_override(store, overridden, settings, index)
    assert sorted(d.event_id for d in propagated) == sorted([copy.event_id, copy2.event_id])
    for e in (copy, copy2):
        now = store.get(e.event_id)
        assert now is not None and now.verdict == Verdict.ALLOW and now.source == "duplicate"
        assert now.matched_event is not None and now.matched_event.event_id == orig.event_id
        assert not store.in_review(e.event_id)
        assert store.audit_of(e.event_id)[0]["matched_event"] == orig.event_id
    still = store.get(other.event_id)
    assert store.in_review(other.event_id) and still is not None and still.source == "model"
    assert [o["event_id"] for o in store.overrides()] == [orig.event_id]  # copies are not moderator labels
    # A second override of the same image finds nothing left to propagate.
    assert (
        propagate_override(store, store.override(orig.event_id, Verdict.BLOCK, "bob"), settings, index) == []
    )


def test_copy_of_a_model_decision_reuses_its_score(
    tmp_path: Path, tiny_checkpoint: Path, redis_url: str
) -> None:
    settings = _settings(tmp_path, redis_url).model_copy(update={"duplicate_reuse_model": True})
    store, index = DecisionStore.from_url(redis_url), DuplicateIndex.from_url(redis_url, settings)
    scorer, fetcher = Scorer.load(str(tiny_checkpoint), settings), Fetcher(settings)
    (orig,) = score_events(_events(tmp_path, {"o.jpg": sample(ORIGINAL)}), scorer, fetcher, duplicates=index)
    store.write(orig)
    index.remember_decisions([orig])

    (copy,) = score_events(
        _events(tmp_path, {"c.jpg": copy_of(sample(ORIGINAL))}), scorer, fetcher, duplicates=index
    )
    assert copy.source == "duplicate" and copy.ai_score == orig.ai_score and copy.verdict == orig.verdict
    assert copy.model_version == scorer.version
    assert copy.matched_event is not None and copy.matched_event.source == "model"

    no_reuse = Scorer.load(str(tiny_checkpoint), settings.model_copy(update={"duplicate_reuse_model": False}))
    (again,) = score_events(
        _events(tmp_path, {"d.jpg": copy_of(sample(ORIGINAL))}), no_reuse, fetcher, duplicates=index
    )
    assert again.source == "model" and again.matched_event is None


def _decision(i: int, pdq: str) -> Decision:
    return Decision(
        item_id=f"item-{i}",
        event_id=f"event-{i}",
        image_uri=f"file:///{i}.jpg",
        verdict=Verdict.ALLOW,
        ai_score=0.1,
        model_version="v1",
        provenance=Provenance(pdq=pdq, pdq_quality=100),
    )


def _random_hash(rng: np.random.Generator) -> str:
    bits = np.zeros(256, np.uint8)
    bits[rng.choice(256, 128, replace=False)] = 1
    return np.packbits(bits).tobytes().hex()


def test_index_is_bounded_and_expires(tmp_path: Path, redis_url: str) -> None:
    rng = np.random.default_rng(0)
    hashes = [_random_hash(rng) for _ in range(5)]
    bounded = _settings(tmp_path, redis_url, duplicate_max_entries=3)
    writer = DuplicateIndex.from_url(redis_url, bounded)
    for i, h in enumerate(hashes):
        writer.remember(h, _decision(i, h))
    reader = DuplicateIndex.from_url(redis_url, bounded)
    reader.sync()
    assert len(reader) == 3
    assert reader.lookup(hashes[0]) is None  # the oldest were evicted
    last = reader.lookup(hashes[4])
    assert last is not None and (last.event_id, last.distance) == ("event-4", 0)
    # Errors and copies are never remembered.
    copy = _decision(9, hashes[0]).model_copy(update={"source": "duplicate"})
    error = _decision(8, hashes[0]).model_copy(update={"verdict": Verdict.ERROR})
    assert writer.remember_decisions([copy, error]) == 0

    # Past the first arrays' capacity: the mirror compacts and grows, and still holds only the newest.
    many = [_random_hash(rng) for _ in range(3000)]
    big = _settings(tmp_path, redis_url, duplicate_max_entries=2000, namespace="big")
    big_writer = DuplicateIndex.from_url(redis_url, big)
    big_writer.remember_decisions(_decision(i, h) for i, h in enumerate(many))
    mirror = DuplicateIndex.from_url(redis_url, big)
    mirror.sync()
    assert len(mirror) == 2000
    assert mirror.lookup(many[999]) is None
    assert [mirror.lookup(many[i]).event_id for i in (1000, 2500, 2999)] == [  # type: ignore[union-attr]
        "event-1000",
        "event-2500",
        "event-2999",
    ]
    # An override of one event replaces its entry instead of adding one.
    overridden = _decision(2999, many[2999]).model_copy(
        update={"source": "moderator:eve", "verdict": Verdict.BLOCK}
    )
    big_writer.remember(many[2999], overridden)
    match = mirror.lookup(many[2999])
    assert match is not None and match.by_moderator and match.verdict == Verdict.BLOCK and len(mirror) == 2000

    short = _settings(tmp_path, redis_url, duplicate_ttl_s=1, namespace="short")
    expiring = DuplicateIndex.from_url(redis_url, short)
    expiring.remember(hashes[1], _decision(1, hashes[1]))
    assert expiring.lookup(hashes[1]) is not None
    time.sleep(1.2)  # past the retention: the entry must no longer match
    assert expiring.lookup(hashes[1]) is None and len(expiring) == 0


def _dev_data() -> Path | None:
    env = os.environ.get("MODERATION_DEV_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "aigen-dev")
    return next((c for c in candidates if (c / "manifest.csv").exists()), None)


def test_same_scene_pair_from_aigen_dev_does_not_match() -> None:
    data = _dev_data()
    if data is None:
        pytest.skip("aigen-dev not found (MODERATION_DEV_DATA or ../shared/data/aigen-dev)")
    left = (data / "real" / "skimage__motorcycle_left.jpg").read_bytes()
    right = (data / "real" / "skimage__motorcycle_right.jpg").read_bytes()
    threshold = Settings().duplicate_threshold
    assert distance(hash_of(left), hash_of(right)) > threshold
    assert distance(hash_of(left), hash_of(copy_of(left))) <= threshold
