"""The batch scoring function on real files, real S3 (moto over HTTP) and a tiny real timm model."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import pytest

from tests.core import images
from worker.errors import CheckpointError, ErrorReason
from worker.media.fetch import Fetcher
from worker.records import Decision, Event, Verdict
from worker.samples import sample_paths
from worker.scoring.checkpoint import load_checkpoint, upload_checkpoint
from worker.scoring.scorer import Scorer, score_events
from worker.settings import CPU_FORWARD_BATCH, Settings


def events_for(refs: list[str]) -> list[Event]:
    return [Event(item_id=f"item-{i}", image_uri=r) for i, r in enumerate(refs)]


def test_awkward_modes_all_score(tmp_path: Path, tiny_checkpoint: Path, settings: Settings) -> None:
    refs = []
    for name, data in images.every_mode().items():
        (tmp_path / name).write_bytes(data)
        refs.append(str(tmp_path / name))
    scorer = Scorer.load(str(tiny_checkpoint), settings)
    decisions = score_events(events_for(refs), scorer, Fetcher(settings))
    assert [d.verdict for d in decisions if d.verdict == Verdict.ERROR] == []
    assert all(0.0 <= (d.ai_score or -1) <= 1.0 for d in decisions)
    assert all(d.model_version == scorer.version for d in decisions)


def test_bad_inputs_become_distinct_error_decisions_while_good_ones_score(
    tmp_path: Path, tiny_checkpoint: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        device="cpu",
        max_bytes=300_000,
        max_pixels=1_000_000,
        s3_endpoint_url=s3_endpoint,
        https_allow_hosts=["images.example.com"],
        fetch_retries=0,
    )
    files = {
        "good1.jpg": images.jpeg(300, 200, 1),
        "empty.jpg": b"",
        "random.bin": bytes(range(256)) * 16,
        "truncated.jpg": images.jpeg(320, 240, 2)[:3000],
        "truncated.png": images.png(320, 240, 3)[:5000],
        "bomb.png": images.png_bomb(50_000, 50_000),
        "huge.png": images.png(400, 400, 4),  # ~480 KB of noise > 300 KB cap
        "doc.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect/></svg>',
        "good2.png": images.png(256, 256, 5),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    refs = [str(tmp_path / n) for n in files]
    refs.insert(5, f"file://{tmp_path / 'good1.jpg'}")
    refs += [
        str(tmp_path / "missing.jpg"),
        f"s3://{s3_bucket}/no/such/object.jpg",
        "https://evil.example.net/x.jpg",
    ]
    expected = {
        "empty.jpg": ErrorReason.EMPTY_FILE,
        "random.bin": ErrorReason.NOT_AN_IMAGE,
        "truncated.jpg": ErrorReason.TRUNCATED_IMAGE,
        "truncated.png": ErrorReason.TRUNCATED_IMAGE,
        "bomb.png": ErrorReason.TOO_MANY_PIXELS,
        "huge.png": ErrorReason.TOO_MANY_BYTES,
        "doc.pdf": ErrorReason.UNSUPPORTED_FORMAT,
        "drawing.svg": ErrorReason.UNSUPPORTED_FORMAT,
        "missing.jpg": ErrorReason.FILE_NOT_FOUND,
        "object.jpg": ErrorReason.S3_OBJECT_NOT_FOUND,
        "x.jpg": ErrorReason.HOST_NOT_ALLOWED,
    }
    scorer = Scorer.load(str(tiny_checkpoint), settings)
    decisions = score_events(events_for(refs), scorer, Fetcher(settings))

    assert len(decisions) == len(refs)
    got = {}
    for ref, d in zip(refs, decisions, strict=True):
        name = ref.rsplit("/", 1)[-1]
        assert d.image_uri == ref
        if name.startswith("good"):
            assert d.verdict != Verdict.ERROR, d
            assert d.ai_score is not None and d.crops
        else:
            assert d.verdict == Verdict.ERROR and d.ai_score is None and d.detail
            got[name] = d.reason
    assert got == expected
    # Different failures get different reasons; only the two truncations and the two foreign formats share.
    assert len(set(got.values())) == len(expected) - 2


def test_s3_fetch_and_s3_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    settings = Settings(home=tmp_path / "home", device="cpu", s3_endpoint_url=s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    sample = sample_paths()[0]
    client.upload_file(str(sample), s3_bucket, "uploads/a.jpg")
    upload_checkpoint(tiny_checkpoint, f"s3://{s3_bucket}/models/tiny", settings)

    remote = Scorer.load(f"s3://{s3_bucket}/models/tiny", settings)
    local = Scorer.load(str(tiny_checkpoint), settings)
    assert remote.version == local.version
    [from_s3, from_disk] = score_events(
        [
            Event(item_id="s3", image_uri=f"s3://{s3_bucket}/uploads/a.jpg"),
            Event(item_id="f", image_uri=str(sample)),
        ],
        remote,
        Fetcher(settings),
    )
    assert from_s3.verdict != Verdict.ERROR
    assert from_s3.ai_score == pytest.approx(from_disk.ai_score, abs=1e-6)


def test_checkpoint_with_tampered_weights_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(bad)


def test_checkpoint_with_tampered_golden_scores_fails_validation(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    import json

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["golden"][0]["logit"] += 3.0
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="golden"):
        Scorer.load(str(bad), Settings(device="cpu"))


def test_scoring_is_deterministic_on_cpu(tiny_checkpoint: Path, settings: Settings) -> None:
    refs = [str(p) for p in sample_paths()]
    first = score_events(events_for(refs), Scorer.load(str(tiny_checkpoint), settings), Fetcher(settings))
    second = score_events(events_for(refs), Scorer.load(str(tiny_checkpoint), settings), Fetcher(settings))
    assert [d.ai_score for d in first] == [d.ai_score for d in second]
    assert len({d.ai_score for d in first}) > 1  # the model does look at the pixels


def test_multi_crop_records_boxes_and_deciding_crop(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = Settings(device="cpu", num_crops=4, aggregation="max")
    path = tmp_path / "wide.png"
    path.write_bytes(images.png(300, 150, 9))
    [d] = score_events(
        events_for([str(path)]), Scorer.load(str(tiny_checkpoint), settings), Fetcher(settings)
    )
    assert len(d.crops) == 4
    assert d.deciding_crop is not None
    assert d.ai_score == pytest.approx(max(c.ai_score for c in d.crops))


def test_cpu_forward_passes_are_split_and_score_as_one_pass(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A model call over many crops runs as several CPU forward passes; the scores do not depend on it."""
    refs = [str(p) for p in sample_paths()]
    for i in range(3):
        (tmp_path / f"wide{i}.png").write_bytes(images.png(300 + 40 * i, 150, 9 + i))
        refs.append(str(tmp_path / f"wide{i}.png"))

    def run(**over: object) -> tuple[list[int], list[Decision]]:
        settings = Settings(device="cpu", num_crops=4, max_batch=64, **over)  # type: ignore[arg-type]
        scorer = Scorer.load(str(tiny_checkpoint), settings)
        passes: list[int] = []
        scorer.model.register_forward_pre_hook(lambda _m, args: passes.append(len(args[0])))
        return passes, score_events(events_for(refs), scorer, Fetcher(settings))

    one_passes, one = run(forward_batch=64)
    split_passes, split = run(forward_batch=5)
    default_passes, default = run()
    n_crops = sum(len(d.crops) for d in one)
    assert n_crops > CPU_FORWARD_BATCH  # enough crops that the default splits too
    assert one_passes == [n_crops]
    assert max(split_passes) <= 5 and sum(split_passes) == n_crops
    assert max(default_passes) == CPU_FORWARD_BATCH and sum(default_passes) == n_crops
    for a, b, c in zip(one, split, default, strict=True):
        assert a.verdict != Verdict.ERROR
        assert b.ai_score == pytest.approx(a.ai_score, abs=1e-5)
        assert c.ai_score == pytest.approx(a.ai_score, abs=1e-5)
        assert [x.ai_score for x in b.crops] == pytest.approx([x.ai_score for x in a.crops], abs=1e-5)
