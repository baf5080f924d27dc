"""Worker memory over many events: RSS after a warm-up vs after the whole run (target: growth under 10%).

    python scripts/soak_memory.py --events 10000

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=1000, help="events before the baseline sample")
    ap.add_argument("--max-growth", type=float, default=0.10)
    args = ap.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        url = os.environ.get("REDIS_URL") or stack.enter_context(private_redis(tmp / "redis"))
        init_checkpoint("test_convnext", tmp / "ckpt", crop_size=64, seed=0)
        paths = []
        for i in range(8):  # a mix of sizes and modes, plus one bad file per chunk
            p = tmp / f"img{i}.{'png' if i % 2 else 'jpg'}"
            Image.effect_mandelbrot((160 + 64 * i, 120 + 48 * i), (-2, -1.5, 1, 1.5), 50).convert(
                "RGB" if i % 3 else "L"
            ).save(p)
            paths.append(p)
        (tmp / "bad.jpg").write_bytes(b"not an image")
        paths.append(tmp / "bad.jpg")
        env = dict(
            os.environ,
            REDIS_URL=url,
            MODERATION_CHECKPOINT=str(tmp / "ckpt"),
            MODERATION_DEVICE="cpu",
            MODERATION_LOG_LEVEL="WARNING",
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
