"""The queue commands as a user runs them: demo on a bare machine, submit --wait, decisions lookup."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli, subprocess_env
from tests.core import images
from tests.worker_proc import running_worker
from worker.samples import sample_paths

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def moderation(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=timeout)


def test_demo_starts_its_own_redis_and_worker_and_decides_every_sample(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    env = subprocess_env(MODERATION_HOME=str(tmp_path / "home"), COLUMNS="200")
    env.pop("REDIS_URL", None)
    env.pop("MODERATION_REDIS_URL", None)
    out = moderation("demo", "--checkpoint", str(tiny_checkpoint), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(sample_paths()) + 1
    assert f"decided {n} events" in out.stdout
    for p in sample_paths():
        assert p.name in out.stdout
    assert "file_not_found" in out.stdout  # the deliberately missing file


def test_submit_wait_prints_decisions_and_decisions_looks_them_up(
    redis_url: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    img = tmp_path / "one.jpg"
    img.write_bytes(images.jpeg(200, 150, seed=4))
    env = subprocess_env(REDIS_URL=redis_url, MODERATION_HOME=str(tmp_path / "home"))
    with running_worker(redis_url, tmp_path, tiny_checkpoint):
        args = ["submit", str(img), str(tmp_path / "nope.png"), "--item-id", "a", "--item-id", "b"]
        out = moderation(*args, "--wait", "--json", env=env)
    assert out.returncode == 0, out.stderr
    decisions = {d["item_id"]: d for d in map(json.loads, out.stdout.splitlines())}
    assert decisions["a"]["verdict"] in ("allow", "review", "block")
    assert decisions["b"]["verdict"] == "error" and decisions["b"]["reason"] == "file_not_found"
    looked = moderation("decisions", "a", "b", "--json", env=env)
    assert looked.returncode == 0
    assert [json.loads(line)["item_id"] for line in looked.stdout.splitlines()] == ["a", "b"]
    missing = moderation("decisions", "zzz", env=env)
    assert missing.returncode == 1 and "no decision for: zzz" in missing.stderr


def test_queue_commands_without_redis_fail_clearly(tmp_path: Path) -> None:
    env = subprocess_env(MODERATION_HOME=str(tmp_path / "home"))
    env.pop("REDIS_URL", None)
    out = moderation("submit", "x.jpg", env=env)
    assert out.returncode == 2
    assert "no Redis configured" in out.stderr
