"""Device JPEG decode: the same crops, scores and typed errors as the Pillow path, on real files.

On the CPU torchvision's decoder is libjpeg-turbo like Pillow's, so everything here is exact; the nvJPEG
tolerance is checked by the ``gpu`` test at the end (skipped without CUDA).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.core import images
from worker.errors import ErrorReason
from worker.media.crops import CropSpec, crop_array, crop_tensor, inference_boxes
from worker.media.fetch import Fetcher
from worker.media.jpeg import JpegDecoder, Pending, plan
from worker.records import Box, Event, Verdict
from worker.scoring.scorer import Prepared, Scorer, prepare_bytes, score_events
from worker.settings import Settings

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]


def jpeg_with(arr: np.ndarray, orientation: int = 1, **kw: object) -> bytes:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    return images.encode(img, "JPEG", quality=kw.pop("quality", 92), exif=exif, **kw)


def planned(data: bytes, spec: CropSpec, max_pixels: int = 50_000_000) -> Pending:
    p = plan(data, spec, max_pixels=max_pixels, allowed_formats=FORMATS)
    assert p is not None
    return p


@pytest.mark.parametrize("orientation", range(1, 9))
def test_crop_tensor_matches_pillow_exif_transpose_for_every_orientation(orientation: int) -> None:
    stored = images.noise(300, 200, seed=orientation)  # stored landscape: 300 wide, 200 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(io.BytesIO(images.encode(Image.fromarray(stored), "PNG", exif=exif))) as img:
        shown = ImageOps.exif_transpose(img)
    spec = CropSpec(64, 6)
    boxes = inference_boxes(shown.width, shown.height, spec)
    assert len(boxes) > 1
    t = torch.from_numpy(stored)
    for box in [*boxes, Box(left=0, top=0, right=64, bottom=64)]:
        np.testing.assert_array_equal(crop_tensor(t, box, orientation).numpy(), crop_array(shown, box))


def test_crop_tensor_refuses_a_box_outside_the_image() -> None:
    with pytest.raises(ValueError, match="outside"):
        crop_tensor(torch.zeros(100, 100, 3, dtype=torch.uint8), Box(left=60, top=0, right=124, bottom=64))


def test_plan_takes_plain_jpegs_and_leaves_everything_else_to_pillow() -> None:
    spec = CropSpec(64, 1)
    rgb = images.noise(120, 90, 1)
    p = planned(jpeg_with(rgb), spec)
    assert p.size == (120, 90) and p.stored == (120, 90) and p.orientation == 1 and len(p.boxes) == 1
    assert planned(images.encode(Image.fromarray(rgb).convert("L"), "JPEG"), spec).size == (120, 90)
    rotated = planned(jpeg_with(rgb, orientation=6), spec)
    assert rotated.size == (90, 120) and rotated.stored == (120, 90)

    full = jpeg_with(rgb)
    refused = {
        "cmyk": images.encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "png": images.png(120, 90),
        "smaller than the window": jpeg_with(images.noise(60, 90)),
        "truncated (no EOI)": full[: len(full) // 2],
        "empty": b"",
        "not an image": bytes(range(256)) * 4,
    }
    for name, data in refused.items():
        assert plan(data, spec, max_pixels=10**8, allowed_formats=FORMATS) is None, name
    assert plan(full, spec, max_pixels=100 * 89, allowed_formats=FORMATS) is None, "pixel cap"
    assert plan(full, spec, max_pixels=10**8, allowed_formats=["PNG"]) is None, "JPEG not allowed"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_device_crops_equal_the_pillow_path_exactly_on_cpu(orientation: int) -> None:
    spec = CropSpec(64, 4)
    settings = Settings(device="cpu")
    data = jpeg_with(images.noise(250, 170, seed=orientation), orientation=orientation)
    pending = planned(data, spec)
    [crops] = JpegDecoder("cpu", 10**9).crops([pending])
    assert isinstance(crops, torch.Tensor)
    reference = prepare_bytes(data, spec, settings)
    assert pending.boxes == reference.boxes and pending.size == reference.size
    assert isinstance(reference.crops, np.ndarray)
    np.testing.assert_array_equal(crops.numpy(), reference.crops)


def test_a_file_the_decoder_refuses_fails_alone_and_small_pixel_budgets_split_calls() -> None:
    spec = CropSpec(64, 1)
    good = [jpeg_with(images.noise(100 + 10 * i, 90, seed=i)) for i in range(4)]
    sos = good[0].index(b"\xff\xda")
    broken = bytearray(good[0])
    broken[sos + 200 : sos + 260] = b"\xff" * 60  # entropy data destroyed; header and EOI intact
    items = [planned(d, spec) for d in (good[0], bytes(broken), *good[1:])]
    for budget in (10**9, 100 * 90 + 1):  # one call for all, or one call per image
        out = JpegDecoder("cpu", budget).crops(items)
        assert isinstance(out[1], Exception)
        for i, d in [(0, good[0]), *((k + 1, good[k]) for k in range(1, 4))]:
            got = out[i]
            assert isinstance(got, torch.Tensor)
            np.testing.assert_array_equal(got.numpy(), prepare_bytes(d, spec, Settings(device="cpu")).crops)


def test_scorer_with_device_decode_gives_the_pillow_decisions(tmp_path: Path, tiny_checkpoint: Path) -> None:
    rgb = images.noise(200, 150, seed=3)
    full = jpeg_with(rgb)
    sos = full.index(b"\xff\xda")
    broken = bytearray(full)
    broken[sos + 200 : sos + 260] = b"\xff" * 60
    files = {
        "plain.jpg": full,
        "rotated.jpg": jpeg_with(images.noise(240, 160, seed=4), orientation=6),
        "gray.jpg": images.encode(Image.fromarray(rgb).convert("L"), "JPEG"),
        "cmyk.jpg": images.encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "small.jpg": jpeg_with(images.noise(40, 30, seed=5)),
        "photo.png": images.png(128, 96, 6),
        "truncated.jpg": full[: len(full) // 2],
        "broken.jpg": bytes(broken),
        "random.jpg": bytes(range(256)) * 8,
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    events = [Event(item_id=n, image_uri=str(tmp_path / n)) for n in [*files, "missing.jpg"]]
    decided = {}
    for mode in ("pillow", "torchvision"):
        settings = Settings(home=tmp_path / "home", device="cpu", jpeg_decode=mode)
        scorer = Scorer.load(str(tiny_checkpoint), settings)
        assert scorer.defers_jpeg == (mode == "torchvision")
        decided[mode] = {d.item_id: d for d in score_events(events, scorer, Fetcher(settings))}
    for e in events:
        a, b = decided["pillow"][e.item_id], decided["torchvision"][e.item_id]
        assert (a.verdict, a.reason, a.image_size, a.crops) == (b.verdict, b.reason, b.image_size, b.crops), e
        assert a.ai_score == b.ai_score, e.item_id
    via_device = {n for n, d in decided["torchvision"].items() if "plan" in d.timings_ms}
    assert via_device == {"plain.jpg", "rotated.jpg", "gray.jpg"}
    errors = {n: d.reason for n, d in decided["torchvision"].items() if d.verdict == Verdict.ERROR}
    assert errors == {
        "truncated.jpg": ErrorReason.TRUNCATED_IMAGE,
        "broken.jpg": ErrorReason.TRUNCATED_IMAGE,
        "random.jpg": ErrorReason.NOT_AN_IMAGE,
        "empty.jpg": ErrorReason.EMPTY_FILE,
        "missing.jpg": ErrorReason.FILE_NOT_FOUND,
    }


def test_items_planned_for_another_window_are_recut_by_pillow(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", device="cpu", jpeg_decode="torchvision")
    scorer = Scorer.load(str(tiny_checkpoint), settings)
    data = jpeg_with(images.noise(200, 150, seed=8))
    stale = planned(data, CropSpec(96, 1))  # planned before a swap to a 64 px model
    [(_, ready)] = scorer.materialize([(Event(item_id="x", image_uri="mem"), stale)])
    assert isinstance(ready, Prepared) and isinstance(ready.crops, np.ndarray)
    assert ready.crops.shape == (1, 64, 64, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_crops_stay_within_a_few_levels_of_pillow() -> None:
    spec = CropSpec(224, 4)
    settings = Settings(device="cuda")
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(16):
        h, w = 700 + 20 * i, 1000 - 10 * i
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, ((xx + yy) // 3) % 256], -1)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        blobs.append(jpeg_with(arr, orientation=1 + i % 8, quality=90))
    items = [planned(b, spec) for b in blobs]
    out = JpegDecoder("cuda", 10**9).crops(items)
    for blob, got in zip(blobs, out, strict=True):
        assert isinstance(got, torch.Tensor) and got.is_cuda
        ref = prepare_bytes(blob, spec, settings).crops
        diff = np.abs(got.cpu().numpy().astype(np.int16) - np.asarray(ref, dtype=np.int16))
        assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())
