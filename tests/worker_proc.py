"""Real ``moderation worker`` processes for integration tests (arq's worker fixture, as a process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.conftest import subprocess_env
from worker.process.runtime import live_workers


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    log_path: Path
    hostname: str
    redis_url: str
    namespace: str = "moderation"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self, n: int) -> list[str]:
        """Hostnames of the children of ``--processes n`` (the supervisor names them ``{hostname}-{i}``)."""
        return [f"{self.hostname}-{i}" for i in range(n)]

    def heartbeat(self, hostname: str | None = None) -> dict[str, str]:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        for w in live_workers(client, self.namespace):
            if w.get("hostname") == (hostname or self.hostname):
                return w
        return {}

    def wait_ready(self, timeout: float = 90.0, hostnames: list[str] | None = None) -> None:
        """Until this worker (or each of ``hostnames``, the children of a supervisor) is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if all(self.heartbeat(h).get("ready") == "1" for h in hostnames or [self.hostname]):
                return
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"worker ignored signal {sig}:\n{self.log()[-4000:]}") from None
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_worker(
    redis_url: str,
    log_dir: Path,
    checkpoint: Path | str | None = None,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    name: str = "w",
) -> WorkerProc:
    hostname = f"{name}-{time.monotonic_ns()}"
    base = {
        "REDIS_URL": redis_url,
        "MODERATION_DEVICE": "cpu",
        "MODERATION_LOG_FORMAT": "json",
        "MODERATION_HEARTBEAT_S": "1",
        "MODERATION_DECODE_THREADS": "2",
        "MODERATION_PREFETCH": "64",
        "MODERATION_HOME": str(log_dir / "home"),
    }
    if checkpoint is not None:
        base["MODERATION_CHECKPOINT"] = str(checkpoint)
    base.update(env or {})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{hostname}.log"
    cmd = [sys.executable, "-m", "worker", "worker", "--hostname", hostname, *(args or [])]
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=subprocess_env(**base), stdout=fh, stderr=subprocess.STDOUT)
    return WorkerProc(proc, log_path, hostname, redis_url, base.get("MODERATION_NAMESPACE", "moderation"))


@contextmanager
def running_worker(
    redis_url: str,
    log_dir: Path,
    checkpoint: Path | str | None = None,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    ready_timeout: float = 90.0,
) -> Iterator[WorkerProc]:
    """A started, ready worker; stopped with SIGTERM (graceful) on exit."""
    w = start_worker(redis_url, log_dir, checkpoint, env, args)
    try:
        w.wait_ready(ready_timeout)
        yield w
    finally:
        if w.proc.poll() is None:
            with suppress(AssertionError):
                w.stop()
