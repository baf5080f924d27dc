"""``moderation publish | promote | rollback | models | shadow`` as users type them.

Most tests drive the real typer app in-process (CliRunner: same code path, no interpreter start-up per
command); one runs the installed entry point in a subprocess end to end.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from tests.conftest import run_cli, subprocess_env
from tests.waiting import eventually
from worker.cli.main import app
from worker.keys import Keys
from worker.lifecycle.shadow import Comparison, record
from worker.records import Decision, Verdict
from worker.scoring.checkpoint import read_manifest


def cli(*args: str, **env: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **env})


@pytest.fixture
def reg(tmp_path: Path) -> str:
    return str(tmp_path / "registry")


def test_publish_promote_rollback_models_and_notifications(
    reg: str, redis_url: str, ckpt_a: Path, ckpt_b: Path
) -> None:
    a, b = read_manifest(ckpt_a).version, read_manifest(ckpt_b).version
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(Keys("moderation").model_channel)
    env = {"MODERATION_REGISTRY": reg, "REDIS_URL": redis_url}

    out = cli("publish", str(ckpt_a), "--promote", "--by", "alice", **env)
    assert out.exit_code == 0, out.output
    assert a in out.output
    out = cli("publish", str(ckpt_b), **env)
    assert out.exit_code == 0, out.output
    out = cli("promote", b, "--by", "bob", **env)
    assert out.exit_code == 0 and f"current is now {b}" in out.output, out.output
    out = cli("rollback", "--by", "carol", **env)
    assert out.exit_code == 0 and f"current is now {a}" in out.output, out.output

    messages: list[dict[str, str]] = []

    def three_notifications() -> list[dict[str, str]]:
        if (m := pubsub.get_message(timeout=0.5)) is not None:
            messages.append(json.loads(m["data"]))
        return messages if len(messages) >= 3 else []

    eventually(three_notifications, "three notifications", 5)
    assert [(m["action"], m["version"], m["by"]) for m in messages] == [
        ("promote", a, "alice"),
        ("promote", b, "bob"),
        ("rollback", a, "carol"),
    ]

    out = cli("models", "--json", **env)
    assert out.exit_code == 0, out.output
    rows = {r["version"]: r for r in json.loads(out.output)}
    assert set(rows) == {a, b}
    assert rows[a]["current"] and not rows[b]["current"]
    assert (rows[a]["action"], rows[a]["promoted_by"]) == ("rollback", "carol")
    assert (rows[b]["action"], rows[b]["promoted_by"]) == ("promote", "bob")
    assert rows[a]["refused"] is None

    client.hset(Keys("moderation").model_refused, b, json.dumps({"reason": "golden", "worker": "w1"}))
    table = cli("models", **env)
    assert table.exit_code == 0, table.output
    assert a in table.output and b in table.output and "rollback by carol" in table.output
    assert "golden (w1)" in table.output


def test_promote_without_redis_still_flips_the_pointer(reg: str, ckpt_a: Path) -> None:
    out = cli("publish", str(ckpt_a), "--promote", MODERATION_REGISTRY=reg)
    assert out.exit_code == 0, out.output
    # An unreachable Redis is a warning: the pointer is the truth and workers poll it.
    out = cli(
        "promote", read_manifest(ckpt_a).version, MODERATION_REGISTRY=reg, REDIS_URL="redis://127.0.0.1:1/0"
    )
    assert out.exit_code == 0, out.output
    assert "could not notify" in out.output


def test_clear_errors(reg: str, ckpt_a: Path, tmp_path: Path) -> None:
    cases = [
        (("promote", "nope"), "not in the registry"),
        (("rollback",), "nothing to roll back"),
        (("publish", str(tmp_path / "missing")), "no manifest.json"),
    ]
    for args, message in cases:
        out = cli(*args, MODERATION_REGISTRY=reg)
        assert out.exit_code == 2, (args, out.output)
        assert message in out.output and "Traceback" not in out.output, (args, out.output)
    out = cli("shadow", "report", MODERATION_REGISTRY=reg)
    assert out.exit_code == 2 and "REDIS_URL" in out.output


def test_shadow_start_report_stop(reg: str, redis_url: str, ckpt_a: Path, ckpt_b: Path) -> None:
    env = {"MODERATION_REGISTRY": reg, "REDIS_URL": redis_url}
    assert cli("publish", str(ckpt_a), "--promote", **env).exit_code == 0
    assert cli("publish", str(ckpt_b), **env).exit_code == 0
    b = read_manifest(ckpt_b).version
    client = redis.Redis.from_url(redis_url)
    keys = Keys("moderation")

    assert cli("shadow", "start", "nope", **env).exit_code == 2  # typo refused before workers see it
    out = cli("shadow", "start", b, **env)
    assert out.exit_code == 0, out.output
    assert client.get(keys.shadow) == b.encode()
    out = cli("shadow", "report", **env)
    assert out.exit_code == 2 and "no shadow statistics" in out.output

    # What workers record (see the watcher tests for the recording itself): 3 events, one disagreement.
    def d(verdict: Verdict, score: float) -> Decision:
        return Decision(item_id="i", event_id="e", image_uri="u", verdict=verdict, ai_score=score)

    pairs = [
        Comparison(d(Verdict.ALLOW, 0.10), d(Verdict.ALLOW, 0.12)),
        Comparison(d(Verdict.ALLOW, 0.20), d(Verdict.ALLOW, 0.20)),
        Comparison(d(Verdict.ALLOW, 0.40), d(Verdict.REVIEW, 0.60)),
    ]
    record(client, keys.shadow_stats(b), pairs, live_ms=10.0, shadow_ms=15.0)
    out = cli("shadow", "report", "--json", **env)
    assert out.exit_code == 0, out.output
    rep = json.loads(out.output)
    assert rep["events"] == 3 and rep["agreement"] == pytest.approx(2 / 3)
    assert rep["mean_abs_diff"] == pytest.approx(0.22 / 3)
    assert rep["p95_abs_diff"] == pytest.approx(0.2, abs=0.0011)  # one 0.001 bin
    assert rep["latency_ratio"] == pytest.approx(1.5)
    assert rep["verdicts"] == {"allow>allow": 2, "allow>review": 1}
    table = cli("shadow", "report", **env)
    assert (
        "66.7%" in table.output
        and "1.50x" in table.output
        and "current allow -> shadow review" in table.output
    )

    out = cli("shadow", "stop", **env)
    assert out.exit_code == 0 and b in out.output
    assert client.get(keys.shadow) is None
    assert cli("shadow", "report", b, "--json", **env).exit_code == 0  # statistics outlive shadow mode


def test_entry_point_on_s3(s3_endpoint: str, s3_bucket: str, ckpt_a: Path, tmp_path: Path) -> None:
    """The real `moderation` command against a registry on an S3 HTTP endpoint."""
    env = subprocess_env(
        MODERATION_REGISTRY=f"s3://{s3_bucket}/reg",
        MODERATION_S3_ENDPOINT_URL=s3_endpoint,
        MODERATION_HOME=str(tmp_path / "home"),
        COLUMNS="200",
    )
    env.pop("REDIS_URL", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=env, timeout=180)

    out = run("publish", str(ckpt_a), "--promote")
    assert out.returncode == 0, out.stderr
    out = run("models", "--json")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row["version"] == read_manifest(ckpt_a).version and row["current"]


def test_help_everywhere() -> None:
    for args in (("publish",), ("promote",), ("rollback",), ("models",), ("shadow",), ("shadow", "start")):
        out = cli(*args, "--help")
        assert out.exit_code == 0 and "Usage" in out.output, args
    assert threading.active_count() >= 1
