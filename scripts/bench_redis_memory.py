"""Redis memory over time while decisions are written with a record TTL and the archiver runs beside them.

    python scripts/bench_redis_memory.py --events 20000 --ttl-s 60 --rate 150 --png docs/redis_memory.png

Starts a private Redis (unless REDIS_URL is set), writes ``--events`` decisions at ``--rate`` per second
through the project's DecisionStore (built from ``Settings`` with ``MODERATION_RECORD_TTL_S`` set to
``--ttl-s``), runs a real ``moderation archive run`` process next to it, and samples ``INFO memory``
``used_memory`` every ``--sample-s`` until ``--tail-s`` after the last write. Prints one line per sample, the
Redis bytes per decision (``MEMORY USAGE`` of records and stream entries), whether the archive holds every
decision exactly once, and writes the curve as a PNG (and CSV) when asked.

If the store does not put a TTL on the records it writes, the script says so: the curve then shows Redis
without expiry.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from worker.delivery.archive import read_archive
from worker.delivery.store import DecisionStore
from worker.process.localredis import private_redis
from worker.records import Box, CropScore, Decision, Thresholds, Verdict
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]
TTL_ENV = "MODERATION_RECORD_TTL_S"


def decision(i: int, rng: random.Random) -> Decision:
    """A decision the size the worker writes: 4 crops, thresholds, timings, a model version."""
    score = rng.random() ** 3
    verdict = Verdict.BLOCK if score >= 0.9 else Verdict.REVIEW if score >= 0.5 else Verdict.ALLOW
    crops = [
        CropScore(box=Box(left=224 * k, top=0, right=224 * (k + 1), bottom=224), ai_score=rng.random())
        for k in range(4)
    ]
    return Decision(
        item_id=f"uploads/2026/12/{i:08d}",
        event_id=f"{i:032x}",
        image_uri=f"s3://uploads/2026/12/{i:08d}.jpg",
        verdict=verdict,
        ai_score=score,
        crops=crops,
        deciding_crop=0,
        model_version="convnext_tiny-20261201-0001",
        thresholds=Thresholds(),
        image_size=(1024, 1024),
        timings_ms={"fetch": 3.1, "decode": 7.2, "model": 1.4, "total": 12.9},
        batch_id=str(i // 64),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--ttl-s", type=float, default=60.0, help=f"record TTL, passed as {TTL_ENV}")
    ap.add_argument("--rate", type=float, default=150.0, help="decisions written per second")
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--tail-s", type=float, default=None, help="sampling after the last write (TTL + 30 s)")
    ap.add_argument(
        "--stream-retention-s",
        type=float,
        default=None,
        help="MODERATION_ARCHIVE_STREAM_RETENTION_S for the archiver (default: the TTL)",
    )
    ap.add_argument("--override-every", type=int, default=200, help="one moderator override per N decisions")
    ap.add_argument("--archive", default=None, help="archive folder or s3:// (default: a temp folder)")
    ap.add_argument(
        "--png", type=Path, default=None, help="write the curve here (e.g. docs/redis_memory.png)"
    )
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args()
    tail_s = args.ttl_s + 30 if args.tail_s is None else args.tail_s
    retention = args.ttl_s if args.stream_retention_s is None else args.stream_retention_s

    os.environ[TTL_ENV] = str(int(args.ttl_s) if float(args.ttl_s).is_integer() else args.ttl_s)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-mem-")))
        url = os.environ.get("REDIS_URL") or stack.enter_context(private_redis(tmp / "redis"))
        settings = Settings(redis_url=url, home=tmp / "home")
        client = redis.Redis.from_url(url, decode_responses=True)
        store = DecisionStore(
            client,
            settings.namespace,
            ttl_s=settings.record_ttl_s,
            decisions_maxlen=settings.decisions_maxlen,
        )
        archive = args.archive or str(tmp / "archive")

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(
            REDIS_URL=url,
            MODERATION_ARCHIVE_URI=archive,
            MODERATION_ARCHIVE_FLUSH_S="5",
            MODERATION_ARCHIVE_STREAM_RETENTION_S=str(retention),
            MODERATION_LOG_LEVEL="WARNING",
            MODERATION_LOG_FORMAT="json",
        )
        archiver = subprocess.Popen(
            [sys.executable, "-m", "worker", "archive", "run"],
            env=env,
            stdout=(tmp / "archiver.log").open("wb"),
            stderr=subprocess.STDOUT,
        )

        def stop_archiver() -> None:
            if archiver.poll() is None:
                archiver.kill()

        stack.callback(stop_archiver)

        samples: list[tuple[float, int, int, int, int]] = []  # t, used_memory, written, keys, stream length
        written = [0]
        done_at: list[float] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                mem = int(client.info("memory")["used_memory"])
                keys, length = int(client.dbsize()), int(client.xlen(store.keys.decisions))
                samples.append((time.monotonic() - t0, mem, written[0], keys, length))
                print(
                    f"t={samples[-1][0]:6.1f}s used_memory={mem / 1e6:8.2f} MB decisions={written[0]:6d} "
                    f"keys={keys} decisions_stream={length}",
                    flush=True,
                )
                stop.wait(args.sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        rng = random.Random(0)
        chunk = max(1, int(args.rate / 10))
        ttl_checked, ttl_applied = False, False
        overrides = 0
        while written[0] < args.events:
            start = time.monotonic()
            n = min(chunk, args.events - written[0])
            batch = [decision(written[0] + j, rng) for j in range(n)]
            store.write_many(batch)
            for d in batch:
                if args.override_every and int(d.event_id, 16) % args.override_every == 0:
                    store.override(d.event_id, Verdict.ALLOW, "bench", note="benchmark override")
                    overrides += 1
            written[0] += n
            if not ttl_checked:
                ttl_checked = True
                ttl = client.ttl(store.keys.decision(batch[0].event_id))
                if ttl < 0:
                    print(
                        f"note: the store does not honour {TTL_ENV} yet: decision records have no TTL "
                        "(the curve shows Redis without expiry)",
                        flush=True,
                    )
                else:
                    ttl_applied = True
                    print(f"decision record TTL: {ttl} s", flush=True)
            time.sleep(max(0.0, n / args.rate - (time.monotonic() - start)))
        done_at.append(time.monotonic() - t0)
        per_decision = bytes_per_decision(client, store)
        time.sleep(tail_s)
        stop.set()
        sampler.join()

        caught_up = wait_archived(client, store, timeout=120)
        if not caught_up:
            print("note: the archiver had not caught up after 120 s; stopping it anyway", flush=True)
        archiver.send_signal(signal.SIGTERM)
        rc = archiver.wait(timeout=120)
        df = read_archive(archive, settings)
        rows = int((df["kind"] == "decision").sum())
        dupes = int(df.duplicated(subset=["stream", "stream_id"]).sum())

        mems = [s[1] for s in samples]
        print()
        print(f"decisions written: {written[0]} in {done_at[0]:.1f} s; overrides: {overrides}")
        applied = "" if ttl_applied else " (not applied by the store)"
        print(
            f"record TTL {args.ttl_s} s{applied}; decisions-stream retention {retention} s; archiver rc {rc}"
        )
        for name, b in per_decision.items():
            print(f"Redis bytes per decision, {name}: {b:.0f}")
        review = int(client.zcard(store.keys.review))
        review_mb = (client.memory_usage(store.keys.review, samples=0) or 0) / 1e6
        overrides_mb = (client.memory_usage(store.keys.overrides, samples=0) or 0) / 1e6
        print(
            f"left in Redis at the end: review queue {review} entries ({review_mb:.2f} MB, no moderator "
            f"works it here), overrides stream {overrides_mb:.2f} MB, "
            f"decisions stream {client.xlen(store.keys.decisions)} entries"
        )
        mb = [f"{x / 1e6:.2f}" for x in (mems[0], max(mems), mems[-1])]
        print(f"used_memory: start {mb[0]} MB, peak {mb[1]} MB, end {mb[2]} MB")
        exact = rows == written[0] and not dupes
        print(
            f"archive: {rows} decision rows for {written[0]} decisions, {(df['kind'] == 'override').sum()} "
            f"override rows, {dupes} duplicate rows -> {'exactly once' if exact else 'MISMATCH'}"
        )
        if args.csv:
            with args.csv.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["t_s", "used_memory_bytes", "decisions_written", "keys", "decisions_stream_len"])
                w.writerows(samples)
        if args.png:
            plot(samples, done_at[0], args, retention, ttl_applied, args.png)
            print(f"curve: {args.png}")
        return 0 if exact else 1


def wait_archived(client: redis.Redis, store: DecisionStore, timeout: float) -> bool:
    """Until the archive group has read and acked everything in the decisions stream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = {g["name"]: g for g in client.xinfo_groups(store.keys.decisions)}
        g = groups.get(os.environ.get("MODERATION_ARCHIVE_GROUP", "archive"))
        if g is not None and int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0:
            return True
        time.sleep(0.2)
    return False


def bytes_per_decision(client: redis.Redis, store: DecisionStore) -> dict[str, float]:
    """MEMORY USAGE of the newest records and of the decisions stream per entry."""
    ids = list(dict.fromkeys(e for _, e, _ in store.recent_decisions(count=50) if e))
    out: dict[str, float] = {}
    rec = [r for r in (client.memory_usage(store.keys.decision(e)) for e in ids) if r]
    if rec:
        out["decision record"] = sum(rec) / len(rec)
    items = [d for d in (store.get(e) for e in ids) if d is not None]
    item_use = [u for u in (client.memory_usage(store.keys.item(d.item_id)) for d in items) if u]
    if item_use:
        out["item record"] = sum(item_use) / len(item_use)
    length = client.xlen(store.keys.decisions)
    usage = client.memory_usage(store.keys.decisions, samples=0)
    if length and usage:
        out["decisions stream entry"] = usage / length
    return out


def plot(
    samples: list[tuple[float, int, int, int, int]],
    done_s: float,
    args: argparse.Namespace,
    retention: float,
    ttl_applied: bool,
    png: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(t, [s[1] / 1e6 for s in samples], label="Redis used_memory (MB)")
    ax.axvline(done_s, color="grey", linestyle="--", label="last decision written")
    ax.set_xlabel("seconds")
    ax.set_ylabel("used_memory (MB)")
    ax2 = ax.twinx()
    ax2.plot(t, [s[2] for s in samples], color="tab:orange", alpha=0.6, label="decisions written")
    ax2.set_ylabel("decisions written")
    ax.set_title(
        f"{args.events} decisions at {args.rate:g}/s, record TTL "
        + (f"{args.ttl_s:g} s" if ttl_applied else "none (the store sets none)")
        + f", stream retention {retention:g} s, archiver running",
        fontsize=10,
    )
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
