"""Measure celery-batches' failure semantics against our delivery guarantee (one decision per event).

    .venv/bin/pip install celery-batches   # not a project dependency: this script is why
    .venv/bin/python scripts/compare_celery_batches.py --events 200

A celery-batches task with ``acks_late=True`` decides events in batches and raises when a batch contains one
poison event (standing in for a model failure on one bad input). The script counts, after the queue is empty,
how many events got a decision, how many are still queued or unacked (would be redelivered), and how many
were acknowledged without a decision: lost. Our worker turns the same poison into one ``error`` decision and
decides the rest (tests/queue/test_queue_worker.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis


def make_app(url: str):  # type: ignore[no-untyped-def]
    from celery import Celery
    from celery_batches import Batches

    app = Celery("cb", broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=0,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options={"visibility_timeout": 5},
    )
    client = redis.Redis.from_url(url)

    @app.task(base=Batches, name="cb.decide", flush_every=32, flush_interval=0.1, acks_late=True)
    def decide(requests):  # type: ignore[no-untyped-def]
        if any(r.args[0] == "poison" for r in requests):
            raise RuntimeError("model failed on one input of the batch")
        for r in requests:
            client.sadd("decided", r.args[0])

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        make_app(args.worker).Worker(pool="threads", concurrency=4, quiet=True, without_mingle=True).start()
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from worker.process.localredis import private_redis

    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as url:
        app = make_app(url)
        ids = [f"e{i}" for i in range(args.events)]
        ids[args.events // 2] = "poison"
        for i in ids:
            app.send_task("cb.decide", args=[i])
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        r = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (r.llen("celery") or r.hlen("unacked")):
            time.sleep(0.2)
        time.sleep(6)  # longer than the visibility timeout: anything unacked would be back by now
        proc.terminate()
        proc.wait(30)
        decided = r.scard("decided")
        pending = r.llen("celery") + r.hlen("unacked")
        lost = args.events - decided - pending
        print(f"celery-batches, acks_late=True, one poison event in {args.events}:")
        print(
            f"  decided {decided}, still queued/unacked {pending}, "
            f"acknowledged without a decision (lost) {lost}"
        )


if __name__ == "__main__":
    main()
