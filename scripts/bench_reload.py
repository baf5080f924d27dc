"""Decision latency around a hot reload vs steady state, through a real ``moderation worker`` process.

Starts a private Redis, a registry with two checkpoints of the same architecture (different seeds) and one
worker following it; submits events at a fixed rate. After a warm-up, time is cut into 60 s cycles: a 30 s
steady window with no reload, then a 30 s window centred on a reload (alternately a promote of the other
version and a rollback). Latency of an event is ``decided_at - submitted_at`` (both stamped on this machine).
"Around a reload" is every event submitted in a reload window, "steady" every event submitted in a steady
window. Interleaving the two kinds of window means background noise on a shared machine hits both alike.

    python scripts/bench_reload.py --arch test_convnext --crop-size 64 --rate 40
    python scripts/bench_reload.py --arch convnext_tiny --crop-size 64 --rate 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.ingress.producer import Producer  # noqa: E402
from worker.keys import Keys  # noqa: E402
from worker.lifecycle.registry import open_registry  # noqa: E402
from worker.lifecycle.reload import notify  # noqa: E402
from worker.process.localredis import private_redis  # noqa: E402
from worker.records import Event, Verdict  # noqa: E402
from worker.scoring.checkpoint import init_checkpoint  # noqa: E402
from worker.settings import Settings  # noqa: E402

WINDOW_S = 30.0


def make_images(d: Path, n: int = 8) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = d / f"img{i}.jpg"
        w, h = 320 + 32 * i, 240 + 24 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=90)
        out.append(p)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="test_convnext")
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--rate", type=float, default=40.0, help="events per second submitted")
    ap.add_argument("--warmup-s", type=float, default=10.0)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--raw", type=Path, help="write (seconds from start, latency ms) per event here (CSV)")
    ap.add_argument("--keep-log", type=Path, help="copy the worker's log here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp_s:
        tmp = Path(tmp_s)
        with private_redis(tmp / "redis") as redis_url:
            settings = Settings(redis_url=redis_url, home=tmp / "home", registry=str(tmp / "registry"))
            registry = open_registry(settings)
            versions = []
            for seed in (1, 2):
                init_checkpoint(args.arch, tmp / f"ckpt{seed}", crop_size=args.crop_size, seed=seed)
                versions.append(registry.publish(tmp / f"ckpt{seed}").version)
            registry.promote(versions[0], by="bench")
            paths = make_images(tmp)

            env = dict(os.environ)
            env.update(
                PYTHONPATH=str(REPO),
                REDIS_URL=redis_url,
                MODERATION_REGISTRY=str(tmp / "registry"),
                MODERATION_HOME=str(tmp / "home"),
                MODERATION_DEVICE="cpu",
                MODERATION_LOG_FORMAT="json",
                MODERATION_HEARTBEAT_S="1",
                MODERATION_LOCAL_ROOTS=str(tmp),  # the generated images
            )
            log_path = tmp / "worker.log"
            with log_path.open("wb") as fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "worker", "worker", "--hostname", "bench"],
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            client = redis.Redis.from_url(redis_url, decode_responses=True)
            try:
                deadline = time.monotonic() + 120
                while client.hget(Keys("moderation").worker("bench"), "ready") != "1":
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"worker did not start:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.2)
                figures = run_load(args, settings, client, paths, versions)
            finally:
                proc.terminate()
                proc.wait(60)
            swaps = log_path.read_text().count('"reloaded"')
            if args.keep_log:
                args.keep_log.write_text(log_path.read_text())
            figures["swaps_logged"] = swaps
            figures["worker_exit_code"] = proc.returncode
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def run_load(
    args: argparse.Namespace, settings: Settings, client: redis.Redis, paths: list[Path], versions: list[str]
) -> dict[str, object]:
    producer = Producer(settings)
    registry = open_registry(settings)
    sent: list[tuple[float, Event]] = []  # (monotonic submit time, event)
    stop = threading.Event()

    def load() -> None:
        period = 1.0 / args.rate
        nxt = time.monotonic()
        i = 0
        while not stop.is_set():
            e = Event(item_id=f"bench-{i}", image_uri=str(paths[i % len(paths)]))
            producer.send(e)
            sent.append((time.monotonic(), e))
            i += 1
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))

    t = threading.Thread(target=load, daemon=True)
    t0 = time.monotonic()
    t.start()
    time.sleep(args.warmup_s)
    start = time.monotonic()
    reload_at: list[float] = []
    for k in range(args.reloads):
        cycle = start + k * 2 * WINDOW_S
        time.sleep(max(0.0, cycle + 1.5 * WINDOW_S - time.monotonic()))
        reload_at.append(time.monotonic())
        if k % 2 == 0:
            registry.promote(versions[1], by="bench")
            notify(client, settings.namespace, "promote", versions[1], "bench")
        else:
            registry.rollback(by="bench")
            notify(client, settings.namespace, "rollback", versions[0], "bench")
    time.sleep(max(0.0, start + args.reloads * 2 * WINDOW_S - time.monotonic()))
    stop.set()
    t.join()

    got = producer.wait([e.event_id for _, e in sent], timeout=120)
    steady: list[float] = []
    around: list[float] = []
    versions_seen: dict[str, int] = {}
    errors = 0
    raw: list[tuple[float, float, str]] = []
    for ts, e in sent:
        d = got.get(e.event_id)
        if d is None:
            continue
        if d.verdict == Verdict.ERROR:
            errors += 1
        versions_seen[d.model_version or "?"] = versions_seen.get(d.model_version or "?", 0) + 1
        ms = (d.decided_at - e.submitted_at).total_seconds() * 1e3
        raw.append((ts, ms, d.model_version or "?"))
        if ts < start:
            continue  # warm-up
        if any(abs(ts - r) <= WINDOW_S / 2 for r in reload_at):
            around.append(ms)
        elif ts < start + args.reloads * 2 * WINDOW_S:
            steady.append(ms)
    producer.close()
    if args.raw:
        rows = ["t_s,latency_ms,version,reload"]
        rows += [
            f"{ts - t0:.3f},{lat:.1f},{ver},{int(any(abs(ts - r) < 0.01 for r in reload_at))}"
            for ts, lat, ver in raw
        ]
        rows += [f"{r - t0:.3f},,reload,1" for r in reload_at]
        args.raw.write_text("\n".join(rows) + "\n")
    p99_s, p99_r = pct(steady, 99), pct(around, 99)
    return {
        "arch": args.arch,
        "crop_size": args.crop_size,
        "rate_per_s": args.rate,
        "reloads": args.reloads,
        "events": len(sent),
        "decided": len(got),
        "errors": errors,
        "decisions_by_version": versions_seen,
        "steady": {"n": len(steady), "p50_ms": round(pct(steady, 50), 1), "p99_ms": round(p99_s, 1)},
        "around_reload": {"n": len(around), "p50_ms": round(pct(around, 50), 1), "p99_ms": round(p99_r, 1)},
        "p99_ratio": round(p99_r / p99_s, 2) if p99_s else None,
    }


if __name__ == "__main__":
    main()
