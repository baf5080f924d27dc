"""Shared fixtures: real services on free local ports, tiny real models, no mocks of our own code.

Every test session starts its own ``redis-server`` (it never relies on the one a machine may run on 6379) and,
when asked, a moto S3 server speaking real HTTP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker.process.localredis import free_port, private_redis
from worker.scoring.checkpoint import init_checkpoint
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# Local image files are refused unless allow-listed; tests write theirs under the temp folder and read the
# bundled samples. Tests of the default set ``local_roots=[]`` themselves.
os.environ.setdefault("MODERATION_LOCAL_ROOTS", ",".join([tempfile.gettempdir(), str(REPO)]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip where CUDA is missing; ``pytest -m gpu`` on a CUDA host runs them.
    ``MODERATION_GPU_TEST_DEVICE=cpu`` runs their logic on the CPU instead; CUDA-only assertions are then left
    out by the tests themselves."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu or os.environ.get("MODERATION_GPU_TEST_DEVICE"):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on a CUDA host)")
    for item in gpu:
        item.add_marker(skip)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout's code first, quiet logs as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("MODERATION_LOG_FORMAT", "json")
    env.update(extra)
    return env


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    """``moderation ARGS`` as a user runs it: a real subprocess of this checkout, no stdin."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd,
        env=env if env is not None else subprocess_env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; scripts/test installs it")
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A flushed database around each test (arq's pattern)."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    yield redis_server
    client.flushall()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A fresh bucket on the moto server, emptied afterwards."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised timm ``test_convnext`` checkpoint with a 64 px window (fast on CPU)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint("test_convnext", path, crop_size=64, num_crops=1, seed=1)
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", device="cpu", log_format="json", decode_threads=2)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
