"""HTTP API fixtures: ``moderation api`` as a real uvicorn subprocess on a free port; tokens from the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli, subprocess_env
from tests.waiting import eventually
from worker.process.localredis import free_port


@dataclass
class ApiProc:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)


def api_env(redis_url: str, home: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(
        REDIS_URL=redis_url, MODERATION_HOME=str(home), MODERATION_LOG_LEVEL="WARNING", **extra
    )


@contextmanager
def running_api(redis_url: str, log_dir: Path, **env: str) -> Iterator[ApiProc]:
    """``moderation api --port P`` until /healthz answers; stopped with SIGTERM afterwards."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"api-{port}.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "api", "--port", str(port)],
            env=api_env(redis_url, log_dir / "home", **env),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    api = ApiProc(proc, f"http://127.0.0.1:{port}", log_path)

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"api exited with {proc.returncode}:\n{api.log()[-4000:]}")
        try:
            return httpx.get(f"{api.url}/healthz", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        try:
            eventually(up, "the api's /healthz", 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{api.log()[-4000:]}") from None
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def make_token(redis_url: str, tmp_path: Path) -> Callable[[str, str], str]:
    """``moderation api token create NAME --scope S`` as an operator runs it; returns the printed token."""

    def make(name: str, scope: str = "submit,read") -> str:
        done = run_cli(
            "api", "token", "create", name, "--scope", scope, env=api_env(redis_url, tmp_path / "home")
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    return make
