"""Decode strategies for the scoring path, images/s on the same JPEGs (one thread unless noted).

1. Pillow: safe decode + native crops, what the decode pool does per image on the CPU path;
2. plan: header only (format, mode, size, EXIF, crop boxes), what the decode pool does per JPEG on CUDA;
3. torchvision on the CPU: batched ``decode_jpeg`` + crops (libjpeg-turbo, for comparison);
4. on CUDA: nvJPEG batched decode + crops on the GPU, per batch size, synchronised (``worker.media.jpeg``).

    python scripts/bench_decode.py --megapixels 1.0 --images 64

Prints a markdown table for docs/benchmarks.md; ``--out`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.media.crops import CropSpec
from worker.media.jpeg import JpegDecoder, Pending, plan
from worker.scoring.scorer import prepare_bytes
from worker.settings import Settings


def make_jpegs(count: int, megapixels: float) -> list[bytes]:
    """The photo-like JPEGs scripts/bench_queue.py measures, as bytes."""
    from bench_queue import make_images  # this script's folder is on sys.path when run as a script

    with tempfile.TemporaryDirectory() as tmp:
        return [p.read_bytes() for p in make_images(Path(tmp), count, megapixels)]


def rate(fn: Callable[[], int], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    sync()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="distinct JPEGs (also the CPU batch)")
    ap.add_argument("--megapixels", type=float, default=1.0)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--crops", type=int, default=1, help="crops per image")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--gpu-batches", default="16,64,256", help="nvJPEG batch sizes (CUDA only)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(1)
    spec = CropSpec(args.crop_size, args.crops)
    settings = Settings(device="cpu")
    blobs = make_jpegs(args.images, args.megapixels)
    planned: list[Pending] = []
    for b in blobs:
        p = plan(b, spec, max_pixels=settings.max_pixels, allowed_formats=settings.allowed_formats)
        assert p is not None
        planned.append(p)

    def pillow() -> int:
        for b in blobs:
            prepare_bytes(b, spec, settings)
        return len(blobs)

    def header() -> int:
        for b in blobs:
            plan(b, spec, max_pixels=settings.max_pixels, allowed_formats=settings.allowed_formats)
        return len(blobs)

    cpu = JpegDecoder("cpu", 10**12)
    res: dict[str, object] = {
        "megapixels": args.megapixels,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "pillow_decode_crop_per_s": rate(pillow, args.seconds),
        "plan_header_only_per_s": rate(header, args.seconds),
        "torchvision_cpu_per_s": rate(lambda: len(cpu.crops(planned)), args.seconds),
    }
    rows = [
        ("Pillow decode + crops (CPU path, per image)", res["pillow_decode_crop_per_s"]),
        ("plan: header + boxes (CUDA path, per JPEG)", res["plan_header_only_per_s"]),
        ("torchvision decode_jpeg on the CPU + crops", res["torchvision_cpu_per_s"]),
    ]
    if torch.cuda.is_available():
        gpu = JpegDecoder("cuda", 10**12)
        res["gpu"] = torch.cuda.get_device_name()
        for bs in (int(x) for x in args.gpu_batches.split(",") if x):
            batch = (planned * (bs // len(planned) + 1))[:bs]

            def on_gpu(batch: list[Pending] = batch) -> int:
                return len(gpu.crops(batch))

            r = rate(on_gpu, args.seconds, torch.cuda.synchronize)
            res[f"nvjpeg_batch{bs}_per_s"] = r
            rows.append((f"nvJPEG batch {bs} + crops on the GPU ({res['gpu']})", r))
    print(json.dumps(res, indent=2))
    print(f"\n{args.megapixels} MP JPEGs, {args.crops} crop(s) of {args.crop_size} px, {res['machine']}:\n")
    print("| strategy | images/s |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {float(str(value)):,.0f} |")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
