"""Worker memory over many events: RSS after a warm-up vs after the whole run (target: growth under 10%).

    python scripts/soak_memory.py --events 10000
    python scripts/soak_memory.py --hostile --events 5000 --chunk 500 --max-rss-mb 2048

``--hostile`` feeds a mix of under-cap hostile images instead (49 MP 16-bit PNGs of under 1 MB, 16-bit RGB,
float TIFF, 48 MP flat JPEGs, a pixel bomb, truncated files, palette and CMYK images, a named pipe, a symlink
out of the allowed folder) between ordinary ones, and reports the worker's peak RSS (``VmHWM``), failing
when it passes ``--max-rss-mb``. ``--arch convnext_tiny`` measures the production architecture.

Starts a private Redis (unless REDIS_URL is set) and a real ``moderation worker`` with a tiny random model,
submits events in chunks, waits for each chunk's decisions and samples the worker's resident set size from
``/proc/<pid>/status``. Prints one line per chunk and a summary; exits 1 if growth exceeds ``--max-growth``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from worker.ingress.producer import Producer
from worker.process.localredis import private_redis
from worker.process.runtime import live_workers
from worker.records import Event
from worker.scoring.checkpoint import init_checkpoint
from worker.settings import Settings


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def hostile_mix(folder: Path, ordinary: list[Path]) -> list[Path]:
    """One cycle of 50 sources: 12 hostile, the rest ordinary images."""
    import io

    from tests.core.images import every_mode, png_bomb
    from tests.hostile.images import png16, tiff_float

    def put(name: str, data: bytes) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    flat = io.BytesIO()
    Image.new("RGB", (8000, 6000), (40, 90, 160)).save(flat, format="JPEG", quality=80)
    good_jpeg = ordinary[0].read_bytes()
    modes = every_mode()
    os.mkfifo(folder / "pipe.jpg")
    (folder / "escape.jpg").symlink_to("/etc/hostname")
    hostile = [
        put("deep_gray_49mp.png", png16(7000, 7000)),
        put("deep_rgb_12mp.png", png16(4000, 3000, color=True)),
        put("float.tiff", tiff_float(2000, 2000)),
        put("flat_48mp.jpg", flat.getvalue()),
        put("bomb.png", png_bomb(20_000, 20_000)),
        put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2]),
        put("cmyk.jpg", modes["cmyk.jpg"]),
        put("palette_transparent.png", modes["palette_transparent.png"]),
        put("deep_gray_49mp_b.png", png16(7000, 7000)),
        folder / "pipe.jpg",
        folder / "escape.jpg",
        folder / "missing.jpg",
    ]
    return hostile + [ordinary[i % len(ordinary)] for i in range(50 - len(hostile))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=1000, help="events before the baseline sample")
    ap.add_argument("--max-growth", type=float, default=0.10)
    ap.add_argument("--hostile", action="store_true", help="the hostile mix; report and bound peak RSS")
    ap.add_argument("--max-rss-mb", type=float, default=2048.0, help="peak RSS bound with --hostile")
    ap.add_argument("--arch", default="test_convnext", help="timm architecture of the random checkpoint")
    ap.add_argument("--crop-size", type=int, default=64)
    args = ap.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        url = os.environ.get("REDIS_URL") or stack.enter_context(private_redis(tmp / "redis"))
        init_checkpoint(args.arch, tmp / "ckpt", crop_size=args.crop_size, seed=0)
        paths = []
        for i in range(8):  # a mix of sizes and modes, plus one bad file per chunk
            p = tmp / f"img{i}.{'png' if i % 2 else 'jpg'}"
            Image.effect_mandelbrot((160 + 64 * i, 120 + 48 * i), (-2, -1.5, 1, 1.5), 50).convert(
                "RGB" if i % 3 else "L"
            ).save(p)
            paths.append(p)
        (tmp / "bad.jpg").write_bytes(b"not an image")
        paths.append(tmp / "bad.jpg")
        if args.hostile:
            paths = hostile_mix(tmp, paths)
        env = dict(
            os.environ,
            REDIS_URL=url,
            MODERATION_CHECKPOINT=str(tmp / "ckpt"),
            MODERATION_DEVICE="cpu",
            MODERATION_LOG_LEVEL="WARNING",
            MODERATION_LOCAL_ROOTS=str(tmp),  # local files are refused outside allow-listed folders
            PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        )
        log = (tmp / "worker.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "worker", "worker"], env=env, stdout=log, stderr=log)
        producer = Producer(Settings(redis_url=url, home=tmp / "home"))
        try:
            while not any(w.get("ready") == "1" for w in live_workers(producer.store.r, "moderation")):
                if proc.poll() is not None:
                    raise SystemExit((tmp / "worker.log").read_text()[-3000:])
                time.sleep(0.2)
            baseline = None
            outcomes: dict[str, int] = {}
            done = 0
            t0 = time.monotonic()
            while done < args.events:
                n = min(args.chunk, args.events - done)
                events = [
                    Event(item_id=f"soak-{done + i}", image_uri=str(paths[(done + i) % len(paths)]))
                    for i in range(n)
                ]
                producer.submit_many(events)
                got = producer.wait([e.event_id for e in events], timeout=600)
                if len(got) != n:
                    raise SystemExit(f"only {len(got)}/{n} decided")
                for d in got.values():
                    key = d.reason.value if d.reason is not None else d.verdict.value
                    outcomes[key] = outcomes.get(key, 0) + 1
                done += n
                rss = rss_mb(proc.pid)
                if baseline is None and done >= args.warmup:
                    baseline = rss
                print(
                    f"{done:>7} events  rss {rss:7.1f} MB  {done / (time.monotonic() - t0):6.1f}/s",
                    flush=True,
                )
            assert baseline is not None
            final = rss_mb(proc.pid)
            if args.hostile:
                peak = peak_rss_mb(proc.pid)
                elapsed = time.monotonic() - t0
                print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
                print(
                    f"hostile mix: {done} events in {elapsed:.0f}s, peak RSS {peak:.1f} MB "
                    f"(bound {args.max_rss_mb:.0f} MB), final {final:.1f} MB"
                )
                sys.exit(0 if peak <= args.max_rss_mb else 1)
            growth = final / baseline - 1
            print(
                f"baseline (after {args.warmup}) {baseline:.1f} MB, final {final:.1f} MB, "
                f"growth {growth:+.1%}"
            )
            sys.exit(0 if growth < args.max_growth else 1)
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
