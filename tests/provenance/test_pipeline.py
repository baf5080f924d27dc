"""Provenance through the scoring pipeline: read in the decode stage, carried on the decision, applied by the
policy (a tiny real timm model scores; no socket opens but to Redis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.provenance import credentials as cr
from worker.media.fetch import Fetcher
from worker.media.provenance import EvidenceMetrics
from worker.records import CredentialState, Decision, Event, Provenance, Verdict
from worker.scoring.scorer import Scorer, score_events
from worker.settings import Settings


@pytest.mark.parametrize("jpeg_decode", ["pillow", "torchvision"])
def test_decisions_carry_provenance_and_the_declared_ai_rule(
    tmp_path: Path,
    tiny_checkpoint: Path,
    trust_file: Path,
    trusted_chain: cr.Chain,
    untrusted_chain: cr.Chain,
    no_network: list[Any],
    jpeg_decode: str,
) -> None:
    files = {
        "trusted_ai.jpg": cr.sign(cr.photo(seed=1), trusted_chain),
        "untrusted_ai.jpg": cr.sign(cr.photo(seed=2), untrusted_chain),
        "tampered_ai.jpg": cr.tamper(cr.sign(cr.photo(seed=3), trusted_chain)),
        "xmp_ai.jpg": cr.with_xmp(cr.photo(seed=4), cr.xmp_packet(cr.AI)),
        "camera.jpg": cr.camera_jpeg(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    settings = Settings(
        home=tmp_path / "home",
        device="cpu",
        jpeg_decode=jpeg_decode,
        provenance_trust_anchors=trust_file,
        provenance_declared_ai_verdict="block",
    )
    scorer = Scorer.load(str(tiny_checkpoint), settings)
    events = [Event(item_id=n, image_uri=str(tmp_path / n)) for n in files]
    by_item = {d.item_id: d for d in score_events(events, scorer, Fetcher(settings), threads=1)}
    assert no_network == []

    trusted = by_item["trusted_ai.jpg"]
    assert trusted.verdict == Verdict.BLOCK
    assert (trusted.source, trusted.detail) == ("provenance", "declared_ai")
    assert trusted.ai_score is not None  # the model still scored it, for the record and for training
    assert trusted.provenance is not None and trusted.provenance.proven_ai
    assert trusted.provenance.pdq is not None and len(trusted.provenance.pdq) == 64
    if jpeg_decode == "torchvision":  # planned in the decode stage, decoded with its batch
        assert "plan" in trusted.timings_ms

    thresholds = scorer.manifest.thresholds
    for name in ("untrusted_ai.jpg", "tampered_ai.jpg", "xmp_ai.jpg", "camera.jpg"):
        d = by_item[name]
        assert d.source == "model" and d.detail is None, name
        assert d.ai_score is not None
        expected = (
            Verdict.BLOCK
            if d.ai_score >= thresholds.block
            else Verdict.REVIEW
            if d.ai_score >= thresholds.review
            else Verdict.ALLOW
        )
        assert d.verdict == expected, name

    def provenance(name: str) -> Provenance:
        found = by_item[name].provenance
        assert found is not None, name
        return found

    assert provenance("untrusted_ai.jpg").credential == CredentialState.UNTRUSTED
    assert provenance("tampered_ai.jpg").credential == CredentialState.INVALID
    assert provenance("xmp_ai.jpg").declared_ai
    assert provenance("camera.jpg").camera_model == "Canon EOS R5"

    # The record survives the decision's JSON (what the store, the stream and the page read back).
    assert Decision.from_json(trusted.to_json()) == trusted

    registry = CollectorRegistry()
    EvidenceMetrics(registry).observe(by_item.values())

    def found(what: str) -> float | None:
        return registry.get_sample_value("moderation_provenance_found_total", {"what": what})

    assert found("credential_trusted") == 1
    assert found("credential_untrusted") == 1
    assert found("credential_invalid") == 1
    assert found("xmp_source_type") == 1
    assert found("exif_camera") == 1
    assert found("declared_ai") == 4 and found("proven_ai") == 1
    assert registry.get_sample_value("moderation_provenance_rules_total", {"rule": "declared_ai"}) == 1


def test_review_setting_and_switches(
    tmp_path: Path, tiny_checkpoint: Path, trust_file: Path, trusted_chain: cr.Chain
) -> None:
    (tmp_path / "a.jpg").write_bytes(cr.sign(cr.photo(seed=1), trusted_chain))
    events = [Event(item_id="a", image_uri=str(tmp_path / "a.jpg"))]
    review = Settings(
        home=tmp_path / "h",
        device="cpu",
        provenance_trust_anchors=trust_file,
        provenance_declared_ai_verdict="review",
    )
    scorer = Scorer.load(str(tiny_checkpoint), review)
    (d,) = score_events(events, scorer, Fetcher(review), threads=1)
    thresholds = scorer.manifest.thresholds
    assert d.verdict == (Verdict.BLOCK if (d.ai_score or 0) >= thresholds.block else Verdict.REVIEW)

    off = review.model_copy(update={"provenance": False, "duplicates": False})
    scorer = Scorer.load(str(tiny_checkpoint), off)
    (d,) = score_events(events, scorer, Fetcher(off), threads=1)
    assert d.provenance is None and d.source == "model"
