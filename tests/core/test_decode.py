"""Safe decode on real bytes: every mode to RGB, EXIF orientation, and a typed reason for every bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from tests.core import images
from worker.errors import DecodeError, ErrorReason
from worker.media.crops import CropSpec, inference_crops
from worker.media.decode import decode_image

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]


def decode(data: bytes, max_pixels: int = 50_000_000) -> Image.Image:
    return decode_image(data, max_pixels=max_pixels, allowed_formats=FORMATS)


@pytest.mark.parametrize("name", sorted(images.every_mode()))
def test_every_mode_decodes_to_rgb(name: str) -> None:
    img = decode(images.every_mode()[name])
    assert img.mode == "RGB"
    assert img.width >= 80 and img.height >= 80


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    img = decode(images.encode(Image.fromarray(arr), "PNG"))
    out = np.asarray(img)
    assert out[5, 5].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    import io

    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = np.asarray(decode(buf.getvalue()))
    assert out[32, 32, 0] > 200 and out[32, 32, 2] < 50


def test_exif_rotated_image_is_cropped_in_display_orientation() -> None:
    stored = images.noise(400, 260, seed=5)  # stored landscape
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": displayed portrait, 260 x 400
    data = images.encode(img, "PNG", exif=exif)
    shown = decode(data)
    assert shown.size == (260, 400)
    expected = np.rot90(stored, k=-1)  # 90 degrees clockwise
    np.testing.assert_array_equal(np.asarray(shown), expected)
    crops, boxes = inference_crops(shown, CropSpec(224, 1))
    b = boxes[0]
    np.testing.assert_array_equal(crops[0], expected[b.top : b.bottom, b.left : b.right])


BAD = {
    "zero bytes": (b"", ErrorReason.EMPTY_FILE),
    "random bytes": (
        bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        ErrorReason.NOT_AN_IMAGE,
    ),
    "truncated jpeg": (images.jpeg()[:3000], ErrorReason.TRUNCATED_IMAGE),
    "truncated png": (images.png()[:5000], ErrorReason.TRUNCATED_IMAGE),
    "pdf": (
        b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n",
        ErrorReason.UNSUPPORTED_FORMAT,
    ),
    "svg": (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        ErrorReason.UNSUPPORTED_FORMAT,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bytes_raise_a_typed_reason(case: str) -> None:
    data, reason = BAD[case]
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason == reason


def test_format_outside_the_allow_list_is_unsupported() -> None:
    data = images.encode(Image.fromarray(images.noise(64, 64)), "BMP")
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=10**8, allowed_formats=["JPEG", "PNG"])
    assert info.value.reason == ErrorReason.UNSUPPORTED_FORMAT


def test_pixel_bomb_is_refused_from_the_header_with_bounded_memory() -> None:
    bomb = images.png_bomb(100_000, 100_000)  # 10 gigapixels claimed, ~1 KB on disk
    assert len(bomb) < 2000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == ErrorReason.TOO_MANY_PIXELS
    assert peak < 20 * 1024 * 1024


def test_pixel_cap_is_configurable() -> None:
    with pytest.raises(DecodeError) as info:
        decode(images.png(200, 200), max_pixels=10_000)
    assert info.value.reason == ErrorReason.TOO_MANY_PIXELS
    assert decode(images.png(200, 200), max_pixels=40_000).size == (200, 200)
