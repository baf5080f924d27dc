#!/usr/bin/env python
"""Cost of the evidence read in the decode stage, and how PDQ distances separate copies from other images.

1. Per-image CPU cost at 1 MP, one thread: full Pillow decode (what the CPU path already pays), provenance
   reading (no credential / a signed C2PA credential / XMP), the PDQ hash from bytes, and a lookup in an
   in-memory mirror of the duplicate index.
2. On aigen-dev (``MODERATION_DEV_DATA`` or ``../shared/data/aigen-dev`` beside the checkout; skipped without
   it): PDQ distances between each image and re-encoded/resized copies of it, and the false-match rate over
   all distinct pairs at the threshold.

    PYTHONPATH=. .venv/bin/python scripts/bench_provenance.py --repeat 30
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pdqhash
from PIL import Image

from tests.provenance.credentials import make_chain, sign, with_xmp, xmp_packet
from worker.media.decode import decode_image
from worker.media.provenance import ProvenanceReader
from worker.samples import sample_paths
from worker.scoring.duplicates import DuplicateIndex, pdq_hash, pdq_hash_image
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]
AI = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def draft_decode(data: bytes, factor: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (img.size[0] // factor, img.size[1] // factor))
    img.load()
    return img


def small_of(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.resize((256, round(h * 256 / w)), Image.Resampling.BILINEAR, reducing_gap=2.0)


def one_megapixel() -> bytes:
    src = next(p for p in sample_paths() if p.name.startswith("skimage__astronaut"))
    img = Image.open(src).convert("RGB").resize((1224, 816), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def costs(repeat: int, index_sizes: list[int]) -> None:
    settings = Settings(home=Path("/tmp/bench-provenance"))
    plain = one_megapixel()
    chain = make_chain("Bench")
    signed = sign(plain, chain)
    xmp = with_xmp(plain, xmp_packet(AI))
    reader = ProvenanceReader(settings)
    buf = io.BytesIO()
    Image.open(io.BytesIO(plain)).save(buf, "PNG")
    png = buf.getvalue()
    decoded = decode_image(plain, max_pixels=10**8, allowed_formats=settings.allowed_formats)
    small = small_of(decoded)
    allowed = settings.allowed_formats
    rows = [
        (
            "decode, Pillow, full (1224x816 JPEG)",
            lambda: decode_image(plain, max_pixels=10**8, allowed_formats=allowed),
        ),
        ("provenance read, no metadata", lambda: reader.read(plain)),
        ("provenance read, XMP source type", lambda: reader.read(xmp)),
        ("provenance read, signed C2PA credential", lambda: reader.read(signed)),
        ("PDQ hash from bytes, JPEG (DCT-scaled decode + hash)", lambda: pdq_hash(plain)),
        ("PDQ hash from the decoded image (the Pillow path's)", lambda: pdq_hash_image(decoded)),
        ("  of which: resize the decoded image to 256 px", lambda: small_of(decoded)),
        ("  of which: pdqhash.compute on 256 px", lambda: pdqhash.compute(np.asarray(small))),
        ("JPEG decode at DCT scale 1/2 (Pillow draft)", lambda: draft_decode(plain, 2)),
        ("JPEG decode at DCT scale 1/4 (Pillow draft)", lambda: draft_decode(plain, 4)),
        ("JPEG decode at DCT scale 1/8 (Pillow draft)", lambda: draft_decode(plain, 8)),
        (
            "decode, Pillow, full (same image as PNG)",
            lambda: decode_image(png, max_pixels=10**8, allowed_formats=allowed),
        ),
        ("PDQ hash from bytes, PNG (full decode + hash)", lambda: pdq_hash(png)),
    ]
    print(f"## per image, one thread, median of {repeat}")
    print("| step | ms |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {median_ms(fn, repeat):.2f} |")
    h = pdq_hash(plain)
    assert h is not None
    rng = np.random.default_rng(0)
    for n in index_sizes:
        index = DuplicateIndex(None, settings.model_copy(update={"duplicate_max_entries": n + 1}))  # type: ignore[arg-type]
        for i in range(n):
            bits = np.zeros(256, np.uint8)
            bits[rng.choice(256, 128, replace=False)] = 1
            index._add(
                f"{i + 1}-0",
                {
                    "h": np.packbits(bits).tobytes().hex(),
                    "e": f"e{i}",
                    "i": f"i{i}",
                    "v": "allow",
                    "s": "0.1",
                    "src": "model",
                    "m": "v1",
                },
            )
        q = np.frombuffer(bytes.fromhex(h[0]), dtype=">u8").astype(np.uint64)

        def lookup(ix: DuplicateIndex = index, q: np.ndarray = q) -> object:
            lo, hi = ix._head, ix._n
            return ix._best(ix._hashes[:, lo:hi], ix._alive[lo:hi], lo, q, None)

        ms = median_ms(lookup, repeat)
        print(f"| lookup in a mirror of {n:,} hashes (XOR + popcount) | {ms:.2f} |")


def copy_of(img: Image.Image, scale: float, quality: int) -> bytes:
    w, h = img.size
    buf = io.BytesIO()
    img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC).save(
        buf, "JPEG", quality=quality
    )
    return buf.getvalue()


def dev_data() -> Path | None:
    env = os.environ.get("MODERATION_DEV_DATA")
    for c in [Path(env)] if env else [REPO.parent / "shared" / "data" / "aigen-dev"]:
        if (c / "manifest.csv").exists():
            return c
    return None


def distances(threshold: int, min_quality: int) -> None:
    data = dev_data()
    if data is None:
        print("aigen-dev not found (MODERATION_DEV_DATA or ../shared/data/aigen-dev): distances skipped")
        return
    files = sorted(data.glob("*/*.jpg"))
    variants = {
        "q70, 0.8x": (0.8, 70),
        "q50, 1.0x": (1.0, 50),
        "q85, 0.5x": (0.5, 85),
        "q70, 1.25x": (1.25, 70),
    }
    hashes: list[str] = []
    names: list[str] = []
    copy_d: dict[str, list[int]] = {k: [] for k in variants}
    flat = 0
    for f in files:
        raw = f.read_bytes()
        h = pdq_hash(raw, 0)
        assert h is not None
        if h[1] < min_quality:
            flat += 1
        hashes.append(h[0])
        names.append(f"{f.parent.name}/{f.name}")
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        for k, (scale, q) in variants.items():
            c = pdq_hash(copy_of(img, scale, q), 0)
            assert c is not None
            copy_d[k].append((int(h[0], 16) ^ int(c[0], 16)).bit_count())
    print(f"\n## aigen-dev: {len(files)} images ({flat} below PDQ quality 50), threshold {threshold}")
    print("| copy | median | p99 | max | copies missed (> threshold) |\n|---|---|---|---|---|")
    for k, ds in copy_d.items():
        a = np.array(ds)
        missed = f"{(a > threshold).sum()} of {len(a)}"
        print(f"| {k} | {np.median(a):.0f} | {np.percentile(a, 99):.0f} | {a.max()} | {missed} |")
    bits = np.unpackbits(
        np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), np.uint8).reshape(len(hashes), 32), axis=1
    )
    packed = np.packbits(bits, axis=1).view(">u8").astype(np.uint64)
    n = len(hashes)
    pair_d = np.concatenate([np.bitwise_count(packed[i + 1 :] ^ packed[i]).sum(axis=1) for i in range(n - 1)])
    pairs = n * (n - 1) // 2
    matches = int((pair_d <= threshold).sum())
    print(
        f"\ndistinct pairs: {pairs:,}; median distance {np.median(pair_d):.0f}, min {pair_d.min()}; "
        f"within the threshold: {matches} ({matches / pairs:.2e})"
    )
    for t in (16, 24, 31, 40, 50, 60):
        print(f"  pairs at distance <= {t}: {int((pair_d <= t).sum())}")
    closest: list[tuple[int, str, str]] = []
    for i in range(n - 1):
        d = np.bitwise_count(packed[i + 1 :] ^ packed[i]).sum(axis=1)
        j = int(d.argmin())
        closest.append((int(d[j]), names[i], names[i + 1 + j]))
    for dist, first, second in sorted(closest)[:5]:
        print(f"  closest: {dist} {first} ~ {second}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--index-sizes", type=int, nargs="*", default=[10_000, 200_000])
    defaults = Settings()
    ap.add_argument("--threshold", type=int, default=defaults.duplicate_threshold)
    ap.add_argument("--skip-costs", action="store_true")
    args = ap.parse_args()
    if not args.skip_costs:
        costs(args.repeat, args.index_sizes)
    distances(args.threshold, defaults.duplicate_min_quality)


if __name__ == "__main__":
    main()
