"""Redis itself fails under load: a private ``redis-server`` with AOF (``appendfsync always``) is killed with
SIGKILL and restarted on the same port and directory while a producer submits and a worker decides.

What Redis acknowledged (an ``XADD`` reply, a decision script reply) is on disk before the reply, so after the
restart every acknowledged event is decided exactly once: the consumer group's pending entries list, the
streams and the decision records all come back from the AOF, and the worker rides out the gap.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.core import images
from tests.queue.test_queue_worker import FAST_RECLAIM, KEYS, _wait_until, held, unread
from tests.worker_proc import running_worker
from worker.ingress.producer import Producer
from worker.process.localredis import free_port
from worker.records import Event, Verdict
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class AofRedis:
    """A redis-server that fsyncs every write to its append-only file, and can be killed and restarted."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        _wait_until(lambda: _pings(client), 20)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path / "aof")
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


def test_redis_killed_and_restarted_with_aof_under_load_loses_nothing_it_acknowledged(
    aof_redis: AofRedis, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    image = tmp_path / "img.jpg"
    image.write_bytes(images.jpeg(160, 120, seed=2))
    producer = Producer(Settings(redis_url=aof_redis.url, home=tmp_path / "home"))
    acknowledged: list[Event] = []
    stop = threading.Event()
    failures: list[str] = []

    def produce() -> None:
        i = 0
        while not stop.is_set():
            chunk = [Event(item_id=f"d-{i + k}", image_uri=str(image)) for k in range(10)]
            i += 10
            try:
                producer.submit_many(chunk)
            except redis.RedisError as exc:  # Redis is down: not acknowledged, so not promised
                failures.append(type(exc).__name__)
                time.sleep(0.1)
                continue
            acknowledged.extend(chunk)
            time.sleep(0.1)

    def decided() -> int:
        return int(redis.Redis.from_url(aof_redis.url).xlen(KEYS.decisions))

    with running_worker(aof_redis.url, tmp_path / "w", tiny_checkpoint, env=FAST_RECLAIM) as w:
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        _wait_until(lambda: decided() >= 50, 120)
        aof_redis.kill()  # no shutdown, no final fsync: only what each reply promised is on disk
        time.sleep(1.0)
        aof_redis.start()
        after = decided()
        _wait_until(lambda: decided() >= after + 100, 120)  # still deciding after the restart
        stop.set()
        thread.join(30)
        got = producer.wait([e.event_id for e in acknowledged], timeout=120)
        _wait_until(lambda: held(aof_redis.url) == 0 and unread(aof_redis.url) == 0, 60)
        assert w.proc.poll() is None
    assert failures, "the producer never saw Redis down"
    missing = [e.event_id for e in acknowledged if e.event_id not in got]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged events lost"
    assert all(d.verdict != Verdict.ERROR for d in got.values())
    client: Any = redis.Redis.from_url(aof_redis.url, decode_responses=True)
    counts = Counter(f["event_id"] for _, f in client.xrange(KEYS.decisions))
    assert max(counts.values()) == 1, "an event was decided twice"
    assert {e.event_id for e in acknowledged} <= set(counts)
    producer.close()
