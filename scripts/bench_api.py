"""Submit throughput of the HTTP API: ``moderation api`` as a subprocess on a private Redis, no worker.

Measures what the API costs per event (HTTP, auth, validation, backlog check, then the Producer's outbox write
and enqueue), in batches and one event per request, from one client with keep-alive, next to the same
Producer calls made in-process:

    python scripts/bench_api.py --events 20000 --batch 500

Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.ingress.producer import Producer
from worker.process.localredis import free_port, private_redis
from worker.records import Event
from worker.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--singles", type=int, default=1000, help="one-event requests to time")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp) / "redis") as url:
        env = {
            "REDIS_URL": url,
            "MODERATION_HOME": tmp,
            "MODERATION_LOG_LEVEL": "WARNING",
            "MODERATION_API_MAX_BACKLOG": str(10 * (args.events + args.singles)),
        }
        token = subprocess.run(
            [sys.executable, "-m", "worker", "api", "token", "create", "bench"],
            env={**env, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "api", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            rows = []
            with httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
            ) as http:

                def ev(i: int) -> dict[str, object]:
                    return {"item_id": f"i{i}", "image_uri": f"s3://bench/{i}.jpg", "metadata": {"n": i}}

                t0 = time.perf_counter()
                for start in range(0, args.events, args.batch):
                    r = http.post("/v1/events", json=[ev(i) for i in range(start, start + args.batch)])
                    assert r.status_code == 202, r.text
                dt = time.perf_counter() - t0
                rows.append((f"POST /v1/events, {args.batch} per request", args.events, dt))
                t0 = time.perf_counter()
                for i in range(args.singles):
                    r = http.post("/v1/events", json=ev(10**9 + i))
                    assert r.status_code == 202, r.text
                rows.append(("POST /v1/events, 1 per request", args.singles, time.perf_counter() - t0))
            # the same work without HTTP: the Producer the API calls, in this process
            producer = Producer(Settings(redis_url=url, home=Path(tmp)))
            batch = [Event(item_id=f"p{i}", image_uri=f"s3://bench/{i}.jpg") for i in range(args.events)]
            t0 = time.perf_counter()
            for start in range(0, args.events, args.batch):
                producer.submit_many(batch[start : start + args.batch])
            rows.append(
                (
                    f"in-process Producer.submit_many, {args.batch} per call",
                    args.events,
                    time.perf_counter() - t0,
                )
            )
            t0 = time.perf_counter()
            for e in [Event(item_id=f"q{i}", image_uri="s3://bench/q.jpg") for i in range(args.singles)]:
                producer.submit_many([e])
            rows.append(
                ("in-process Producer.submit_many, 1 per call", args.singles, time.perf_counter() - t0)
            )
            producer.close()
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"{platform.machine()}, {platform.python_version()}, one uvicorn process, one client, keep-alive\n")
    print("| requests | events | seconds | events/s |\n|---|---|---|---|")
    for name, n, dt in rows:
        print(f"| {name} | {n} | {dt:.2f} | {n / dt:,.0f} |")


if __name__ == "__main__":
    main()
