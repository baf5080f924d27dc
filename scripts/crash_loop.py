"""Repeat the kill -9 crash test and count lost and duplicated events per run.

    python scripts/crash_loop.py --runs 8

Each run: a private Redis, a real worker (test_convnext, 4 s visibility timeout), 300 events of 0.8 MP, the
worker killed with SIGKILL after 20 decisions, a second worker started; then every event must have exactly one
decision. Prints per run: missing events, dead letters, entries the second worker reclaimed (``XAUTOCLAIM``)
and decisions on the stream.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.core import images
from tests.worker_proc import start_worker
from worker.ingress.producer import Producer
from worker.keys import Keys
from worker.process.localredis import private_redis
from worker.records import Event
from worker.scoring.checkpoint import init_checkpoint
from worker.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--events", type=int, default=300)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="crash-"))
    init_checkpoint("test_convnext", tmp / "ck", crop_size=64)
    (tmp / "big.jpg").write_bytes(images.jpeg(1024, 768))
    env = {
        "MODERATION_VISIBILITY_TIMEOUT_S": "4",
        "MODERATION_RECLAIM_INTERVAL_S": "1",
        "MODERATION_LOCAL_ROOTS": str(tmp),
    }
    keys = Keys("moderation")
    lost_runs = 0
    for run in range(args.runs):
        with private_redis(tmp / f"redis{run}") as url:
            r = redis.Redis.from_url(url, decode_responses=True)
            producer = Producer(Settings(redis_url=url, home=tmp / "home"))
            events = [Event(item_id=f"big-{i}", image_uri=str(tmp / "big.jpg")) for i in range(args.events)]
            first = start_worker(url, tmp, tmp / "ck", env=env)
            first.wait_ready()
            producer.submit_many(events)
            while r.xlen(keys.decisions) < 20:
                time.sleep(0.05)
            first.kill()
            second = start_worker(url, tmp, tmp / "ck", env=env)
            second.wait_ready()
            got = producer.wait([e.event_id for e in events], 120)
            missing = len(events) - len(got)
            lost_runs += missing > 0
            print(
                f"run {run}: missing {missing}, dead letters {r.xlen(keys.deadletter)}, "
                f"reclaim rounds {second.log().count('entries_reclaimed')}, "
                f"decisions on stream {r.xlen(keys.decisions)}",
                flush=True,
            )
            second.stop()
    sys.exit(1 if lost_runs else 0)


if __name__ == "__main__":
    main()
