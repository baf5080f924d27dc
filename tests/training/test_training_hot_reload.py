"""A candidate that passes the gate is published, and a running worker hot-reloads it without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.training.helpers import invoke
from tests.training.test_training_evaluate import constant_checkpoint
from tests.worker_proc import running_worker
from worker.lifecycle.registry import LocalStore, Registry


@pytest.mark.integration
@pytest.mark.slow
def test_gate_publishes_and_a_running_worker_reloads(image_set: Path, redis_url: str, tmp_path: Path) -> None:
    reg_dir = tmp_path / "registry"
    registry = Registry(LocalStore(reg_dir))
    old = registry.publish(constant_checkpoint(tmp_path / "old", -5.0), promote=True, by="test").version
    env = {"MODERATION_REGISTRY": str(reg_dir), "MODERATION_RELOAD_POLL_S": "30"}
    with running_worker(redis_url, tmp_path, env=env) as w:
        assert w.heartbeat().get("model_version") == old
        pid = w.pid
        candidate = constant_checkpoint(tmp_path / "new", -4.0)
        code, out, err = invoke(
            *("gate", str(candidate), "-l", str(image_set), "--registry", str(reg_dir), "--split", "all"),
            *("--min-heldout", "20", "--min-per-class", "10", "--n-boot", "200"),
            cwd=tmp_path,
            env={"REDIS_URL": redis_url, "MODERATION_HOME": str(tmp_path / "home")},
        )
        assert code == 0, out + err
        new = registry.current_version()
        assert new is not None and new != old and new in out
        # the gate's notification, not the 30 s poll, makes the worker switch
        deadline = time.monotonic() + 15
        while w.heartbeat().get("model_version") != new:
            assert time.monotonic() < deadline, w.log()[-3000:]
            time.sleep(0.2)
        assert w.pid == pid and w.proc.poll() is None
