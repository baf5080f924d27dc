"""Retrain trigger end to end: CLI -> Celery training queue (real Redis) -> real train-worker process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, subprocess_env
from tests.waiting import eventually
from training.jobs import JobStore
from worker.lifecycle.registry import LocalStore, Registry


@pytest.mark.integration
@pytest.mark.slow
def test_retrain_runs_on_the_training_worker_and_reports(
    image_set: Path, redis_url: str, tmp_path: Path
) -> None:
    env = {
        "REDIS_URL": redis_url,
        "MODERATION_NAMESPACE": "tj",
        "MODERATION_HOME": str(tmp_path / "home"),
        "MODERATION_DEVICE": "cpu",
    }
    log = (tmp_path / "train-worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "train-worker", "--hostname", "tw"],
        cwd=tmp_path,
        env=subprocess_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        opts = ["arch=test_resnet", "crop_size=32", "epochs=1", "batch_size=8", "workers=0", "device=cpu"]
        opts.append("min_heldout_per_class=2")
        bogus = run_cli(
            "retrain", "-l", str(image_set), "-O", "bogus=1", cwd=tmp_path, env=subprocess_env(**env)
        )
        assert bogus.returncode == 2 and "bogus" in bogus.stderr and "Traceback" not in bogus.stderr
        sent = run_cli(
            "retrain",
            *("-l", str(image_set), "--publish", "--min-heldout", "0", "--min-per-class", "0"),
            *[a for o in opts for a in ("-O", o)],
            cwd=tmp_path,
            env=subprocess_env(**env),
        )
        assert sent.returncode == 0, sent.stderr[-2000:]
        import redis

        store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), "tj")
        job_id = store.latest()[0]
        assert job_id in sent.stdout

        def finished() -> dict[str, str]:
            """The job's status once it ended; empty while it is queued or running."""
            assert proc.poll() is None, (tmp_path / "train-worker.log").read_text()[-4000:]
            job = store.get(job_id)
            return {} if job.get("state") in ("queued", "running") else job

        status = eventually(finished, f"training job {job_id} to finish", timeout=240, interval=0.5)
        assert status["state"] == "succeeded", status.get("traceback") or status
        report = json.loads(status["report"])
        assert report["split"] == "test" and report["test"]["n"] > 0
        gate = json.loads(status["gate"])
        assert gate["published"] and gate["current_version"] is None  # first version
        registry = Registry(LocalStore(tmp_path / "home" / "registry"))
        assert registry.current_version() == status["version"]

        shown = run_cli("retrain", "status", cwd=tmp_path, env=subprocess_env(COLUMNS="200", **env))
        assert shown.returncode == 0, shown.stderr
        assert job_id in shown.stdout and "succeeded" in shown.stdout and "ROC-AUC" in shown.stdout
        missing = run_cli("retrain", "status", "nope", cwd=tmp_path, env=subprocess_env(**env))
        assert missing.returncode == 2 and "unknown training job" in missing.stderr
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
