"""Under-cap images that cost memory: the decode budget bounds bytes, not only pixels."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import subprocess_env
from tests.hostile.images import png16, tiff_float
from worker.errors import DecodeError, ErrorReason
from worker.media.decode import DecodeBudget, decode_bytes, decode_image

FORMATS = ["PNG", "TIFF", "JPEG"]


def test_sixteen_bit_is_scaled_exactly_as_before() -> None:
    import io

    arr = np.array([[0, 128, 129, 385, 65535, 40000]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = np.asarray(decode_image(buf.getvalue(), max_pixels=10**6, allowed_formats=FORMATS))
    want = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    assert (out[..., 0] == want).all() and (out[..., 1] == want).all()


def test_float_images_are_stretched_to_the_full_range() -> None:
    out = np.asarray(decode_image(tiff_float(300, 200), max_pixels=10**6, allowed_formats=FORMATS))
    assert out.shape == (200, 300, 3) and out.min() == 0 and out.max() == 255


def test_an_image_over_the_byte_budget_is_refused_from_its_header() -> None:
    data = png16(3000, 3000)  # 9 MP: far under a 50 MP pixel cap
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=50_000_000, allowed_formats=FORMATS, max_bytes=64 * 2**20)
    assert info.value.reason == ErrorReason.DECODE_TOO_LARGE
    assert decode_bytes(3000, 3000, "I;16", transposed=True) > 64 * 2**20
    img = decode_image(data, max_pixels=50_000_000, allowed_formats=FORMATS, max_bytes=256 * 2**20)
    assert img.size == (3000, 3000) and img.mode == "RGB"


def test_concurrent_decodes_wait_for_room_in_the_budget() -> None:
    budget = DecodeBudget(100)
    held = threading.Event()
    order: list[str] = []

    def second() -> None:
        with budget.reserve(60):
            order.append("second")

    with budget.reserve(60):
        t = threading.Thread(target=second)
        t.start()
        held.wait(0.3)
        order.append("first-done")
        assert budget.used == 60
    t.join(10)
    assert order == ["first-done", "second"] and budget.used == 0
    with pytest.raises(DecodeError), budget.reserve(101):
        pass


PEAK = """
import json, resource, sys
from tests.hostile.images import png16
from worker.media.decode import decode_image
data = png16(7000, 7000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = decode_image(data, max_pixels=50_000_000, allowed_formats=["PNG"], max_bytes=768 * 2**20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"size": img.size, "mode": img.mode, "extra_mb": (after - before) / 1024}))
"""


def test_a_16_bit_7000px_png_decodes_without_float64_widening() -> None:
    """49 MP of 16-bit samples: the RGB result is 196 MB; float64 widening used to take it past 1.2 GB."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["size"] == [7000, 7000] and got["mode"] == "RGB"
    assert got["extra_mb"] < 600, got


def test_the_estimate_covers_what_a_decode_really_takes() -> None:
    """tracemalloc sees numpy's buffers: the conversion's own peak stays under its share of the estimate."""
    import io
    import tracemalloc

    arr = (np.arange(2000 * 1500, dtype=np.uint32) % 65536).astype(np.uint16).reshape(1500, 2000)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    tracemalloc.start()
    decode_image(buf.getvalue(), max_pixels=10**8, allowed_formats=FORMATS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < decode_bytes(2000, 1500, "I;16")


def test_the_review_page_decodes_under_the_same_budget_and_keeps_no_huge_images(tmp_path: Path) -> None:
    from worker.media.fetch import Fetcher
    from worker.review.media import Images, thumbnail
    from worker.settings import Settings

    deep = tmp_path / "deep.png"
    deep.write_bytes(png16(3000, 3000))  # 9 MP, 16-bit: ~72 MB at its decode peak
    small = Settings(home=tmp_path / "h", local_roots=[str(tmp_path)], max_decode_bytes=32 * 2**20)
    with pytest.raises(DecodeError) as info:
        Images(Fetcher(small)).decoded(str(deep))
    assert info.value.reason == ErrorReason.DECODE_TOO_LARGE
    roomy = small.model_copy(update={"max_decode_bytes": 256 * 2**20})
    images = Images(Fetcher(roomy))
    assert len(thumbnail(images.decoded(str(deep)))) > 0
    assert images._cache.get(str(deep)) is None  # 36 MB of RGB is over its share of the budget: not kept
