"""End-to-end throughput and latency through real Redis and a real worker, next to the in-process baselines.

Three numbers on the same images, model and batch size:

1. model only: ``Scorer.logits`` on ready-made crops (the ceiling);
2. in-process loop: fetch + decode + crop (thread pool) then one model call per batch, no queue;
3. end to end: events added to the Redis streams, read in batches and decided by a ``moderation worker``
   subprocess, read back (saturation throughput with everything enqueued at once, then latency at a fixed
   offered load).

Plus the CPU each costs per event: the in-process loop's (this process) against the worker's (the worker
process and its children), the figure that says how many cores a GPU host spends on bookkeeping.

    python scripts/bench_queue.py --arch convnext_tiny --events 400 --megapixels 1.0

Prints a markdown table for docs/benchmarks.md and writes the raw figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.ingress.producer import Producer
from worker.media.fetch import Fetcher
from worker.process.localredis import private_redis
from worker.process.runtime import live_workers
from worker.records import Event, utcnow
from worker.scoring.checkpoint import init_checkpoint
from worker.scoring.scorer import Scorer, score_events
from worker.settings import Settings


def make_images(folder: Path, count: int, megapixels: float) -> list[Path]:
    """Photo-like JPEGs (smooth gradients plus noise, quality 90) of about ``megapixels``."""
    rng = np.random.default_rng(0)
    w = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = int(w * 3 / 4)
    paths = []
    for i in range(count):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, ((xx + yy) // 3) % 256], -1).astype(np.float32)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def model_only(scorer: Scorer, batch: int, seconds: float = 10.0) -> float:
    s = scorer.spec.size
    crops = np.random.default_rng(0).integers(0, 255, (batch, s, s, 3), dtype=np.uint8)
    scorer.logits(crops)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        scorer.logits(crops)
        n += batch
    return n / (time.perf_counter() - t0)


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def in_process(scorer: Scorer, settings: Settings, events: list[Event], batch: int) -> tuple[float, float]:
    """(events/s, CPU ms per event) of parse + fetch + decode + crop + model + decision JSON, no queue."""
    fetcher = Fetcher(settings)
    raws = [e.model_dump_json() for e in events]
    score_events(events[:batch], scorer, fetcher)  # warm-up
    cpu0, t0 = _cpu_self(), time.perf_counter()
    for i in range(0, len(raws), batch):
        chunk = [Event.from_json(r) for r in raws[i : i + batch]]
        for d in score_events(chunk, scorer, fetcher):
            d.to_json()
    wall, cpu = time.perf_counter() - t0, _cpu_self() - cpu0
    return len(events) / wall, 1e3 * cpu / len(events)


TICK_S = 0.002


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (Linux /proc; 0 elsewhere)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _send_slice(redis_url: str, home: str, events: list[Event], rate: float, t0: float) -> list[Event]:
    """Open-loop sender: every tick, the events now due go out in one bulk submit, stamped as sent."""
    producer = Producer(Settings(redis_url=redis_url, home=Path(home)))
    out: list[Event] = []
    i = 0
    try:
        while i < len(events):
            due = min(len(events), int((time.time() - t0) * rate) + 1)
            if due <= i:
                time.sleep(TICK_S)
                continue
            now = utcnow()
            burst = [e.model_copy(update={"submitted_at": now}) for e in events[i:due]]
            producer.submit_many(burst)
            out += burst
            i = due
    finally:
        producer.close()
    return out


def offer(settings: Settings, events: list[Event], rate: float, senders: int) -> list[Event]:
    """Send ``events`` at ``rate``/s from ``senders`` processes (one Python sender tops out below a GPU
    worker's rate); latency is measured from each event's actual send, so a sender that falls behind shows
    as a lower ``sent_per_s``, not as lower latency."""
    t0 = time.time() + 0.5
    if senders <= 1:
        return _send_slice(settings.redis_url or "", str(settings.home), events, rate, t0)
    from concurrent.futures import ProcessPoolExecutor

    slices = [events[k::senders] for k in range(senders)]
    with ProcessPoolExecutor(senders) as pool:
        futures = [
            pool.submit(_send_slice, settings.redis_url or "", str(settings.home), sl, rate / senders, t0)
            for sl in slices
        ]
        return [e for f in futures for e in f.result()]


def end_to_end(
    settings: Settings,
    ckpt: str,
    events: list[Event],
    rate: float | None,
    tmp: Path,
    threads: int,
    processes: int = 1,
    senders: int = 1,
) -> dict[str, float]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=settings.redis_url or "",
        MODERATION_CHECKPOINT=ckpt,
        MODERATION_DEVICE=settings.device,
        MODERATION_MAX_BATCH=str(settings.max_batch),
        MODERATION_MAX_WAIT_MS=str(settings.max_wait_ms),
        MODERATION_DECODE_THREADS=str(settings.decode_threads),
        MODERATION_PREFETCH=str(threads),
        MODERATION_LOG_LEVEL="WARNING",
        MODERATION_LOG_FORMAT="json",
        MODERATION_LOCAL_ROOTS=str(tmp),  # the generated images; local files are off by default
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    )
    producer = Producer(settings)
    warm = [Event(item_id=f"warm{i}", image_uri=events[0].image_uri) for i in range(2 * settings.max_batch)]
    if rate is None:
        # Saturation: everything is queued before the worker starts, so submission cost is not measured and
        # the worker is never starved; the rate is taken between the first and last of the measured decisions.
        producer.submit_many(warm + events)
    log = (tmp / "worker.log").open("wb")
    # --processes N: a supervisor and N children named {hostname}-{i}; wait until every one of them is ready.
    hostname = f"bench-{time.monotonic_ns()}"
    want = {hostname} if processes == 1 else {f"{hostname}-{i}" for i in range(processes)}
    cmd = [sys.executable, "-m", "worker", "worker", "--processes", str(processes), "--hostname", hostname]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        while not want <= {
            w.get("hostname")
            for w in live_workers(producer.store.r, settings.namespace)
            if w.get("ready") == "1"
        }:
            if proc.poll() is not None:
                raise SystemExit(f"worker died:\n{(tmp / 'worker.log').read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        if rate is not None:
            producer.submit_many(warm)
            producer.wait([e.event_id for e in warm], 300)
        cpu0 = cpu_seconds(proc.pid)
        if rate is not None:
            events = offer(settings, events, rate, senders)
        got = producer.wait([e.event_id for e in events], timeout=3600)
        worker_cpu = cpu_seconds(proc.pid) - cpu0
        decided = [d.decided_at.timestamp() for d in got.values()]
        start = min(decided) if rate is None else min(e.submitted_at for e in events).timestamp()
        lat = [(d.decided_at - e.submitted_at).total_seconds() for e in events if (d := got.get(e.event_id))]
        errors = sum(1 for d in got.values() if d.verdict == "error")
        sent = sorted(e.submitted_at.timestamp() for e in events)
        return {
            "decisions_per_s": (len(got) - 1) / (max(decided) - start),
            **({"sent_per_s": (len(sent) - 1) / (sent[-1] - sent[0])} if rate and sent[-1] > sent[0] else {}),
            "decided": len(got),
            "errors": errors,
            # the worker processes' CPU per decided event: the Python/broker cost that caps one process
            "worker_cpu_ms_per_event": 1e3 * worker_cpu / max(1, len(got)),
            **percentiles(lat),
        }
    finally:
        proc.terminate()
        proc.wait(120)
        producer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="convnext_tiny")
    ap.add_argument("--checkpoint", help="Use this checkpoint instead of a random one of --arch.")
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--distinct-images", type=int, default=16)
    ap.add_argument("--megapixels", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32, help="max_batch, same for all three measurements")
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=128, help="entries a worker holds (prefetch), per process")
    ap.add_argument(
        "--processes", type=int, default=1, help="worker processes (moderation worker --processes)"
    )
    ap.add_argument(
        "--senders",
        type=int,
        default=1,
        help="sender processes for the fixed load (one tops out near 1,000/s)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--load", type=float, default=0.7, help="offered load as a share of saturation throughput"
    )
    ap.add_argument("--e2e-only", action="store_true", help="skip the in-process baselines")
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--no-fixed-load", action="store_true", help="saturation only (shorter runs)")
    ap.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads here and in the worker (OMP_NUM_THREADS); on a shared, oversubscribed host "
        "OpenMP's spin-waiting otherwise dominates both CPU figures",
    )
    ap.add_argument("--out", type=Path, help="write raw figures as JSON here")
    args = ap.parse_args()
    if args.torch_threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited by the worker
        torch.set_num_threads(args.torch_threads)

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        url = os.environ.get("REDIS_URL") or stack.enter_context(private_redis(tmp / "redis"))
        settings = Settings(
            redis_url=url,
            device=args.device,
            max_batch=args.batch,
            max_wait_ms=args.max_wait_ms,
            decode_threads=args.decode_threads,
            home=tmp / "home",
            local_roots=[tmp],
        )
        ckpt = args.checkpoint or str(tmp / "ckpt")
        if not args.checkpoint:
            init_checkpoint(args.arch, ckpt, crop_size=args.crop_size, seed=0)
        paths = make_images(tmp, args.distinct_images, args.megapixels)

        def mk(tag: str) -> list[Event]:
            return [
                Event(item_id=f"{tag}{i}", image_uri=str(paths[i % len(paths)])) for i in range(args.events)
            ]

        scorer = Scorer.load(ckpt, settings)
        res: dict[str, object] = {
            "arch": scorer.manifest.arch,
            "device": settings.resolved_device(),
            "events": args.events,
            "batch": args.batch,
            "processes": args.processes,
            "megapixels": args.megapixels,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch_threads": args.torch_threads,
            "load_average": os.getloadavg()[0],
        }
        if args.e2e_only:
            res["model_only_images_per_s"] = res["in_process_images_per_s"] = float("nan")
            res["in_process_cpu_ms_per_event"] = float("nan")
        else:
            print("model only ...", flush=True)
            res["model_only_images_per_s"] = model_only(scorer, args.batch)
            print("in-process decode+crop+model ...", flush=True)
            rate_ip, cpu_ip = in_process(scorer, settings, mk("ip"), args.batch)
            res["in_process_images_per_s"], res["in_process_cpu_ms_per_event"] = rate_ip, cpu_ip
        del scorer
        print("end to end, saturation ...", flush=True)
        sat = end_to_end(settings, ckpt, mk("sat"), None, tmp, args.threads, args.processes)
        res["e2e_saturation"] = sat  # latency here is queueing time of a full backlog, not service latency
        rate = args.load * sat["decisions_per_s"]
        if not args.no_fixed_load:
            print(f"end to end, fixed load {rate:.1f}/s ...", flush=True)
            res["e2e_fixed_load"] = {
                "offered_per_s": rate,
                **end_to_end(
                    settings, ckpt, mk("fix"), rate, tmp, args.threads, args.processes, args.senders
                ),
            }
        res["e2e_vs_in_process"] = sat["decisions_per_s"] / float(res["in_process_images_per_s"])  # type: ignore[arg-type]
        res["worker_cpu_vs_in_process"] = sat["worker_cpu_ms_per_event"] / float(
            res["in_process_cpu_ms_per_event"]  # type: ignore[arg-type]
        )
    print(json.dumps(res, indent=2))
    print(
        f"\nworker CPU {sat['worker_cpu_ms_per_event']:.2f} ms/event vs in-process "
        f"{res['in_process_cpu_ms_per_event']:.2f} ms/event ({res['worker_cpu_vs_in_process']:.2f}x); "
        f"saturation {sat['decisions_per_s']:.0f}/s vs in-process {res['in_process_images_per_s']:.0f}/s "
        f"({res['e2e_vs_in_process']:.2f})"
    )
    fixed = res.get("e2e_fixed_load")
    if not isinstance(fixed, dict):
        fixed = {"offered_per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan")}
    print(
        f"\n| {res['arch']} | {res['device']} | {args.megapixels} MP | {args.batch} | "
        f"{res['model_only_images_per_s']:.1f} | {res['in_process_images_per_s']:.1f} | "
        f"{sat['decisions_per_s']:.1f} ({res['e2e_vs_in_process']:.0%}) | "
        f"{sat['p50_ms']:.0f} / {sat['p99_ms']:.0f} | "
        f"{fixed['offered_per_s']:.1f}/s: {fixed['p50_ms']:.0f} / {fixed['p99_ms']:.0f} |"
    )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
