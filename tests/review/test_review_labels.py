"""Overrides become training labels; accounts are written with argon2 hashes; ``moderation review`` serves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import subprocess_env
from tests.review.conftest import Decided
from worker.cli.main import app
from worker.process.localredis import free_port
from worker.records import Decision, Verdict
from worker.review.auth import Directory, Role, read_store
from worker.review.media import image_source

pytestmark = pytest.mark.integration


def export(decided: Decided, out: Path, *extra: str) -> tuple[int, str]:
    s = decided.settings
    args = [
        "labels",
        "export",
        "--out",
        str(out),
        "--redis-url",
        s.redis_url or "",
        "--namespace",
        s.namespace,
        *extra,
    ]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def test_labels_export_writes_the_latest_override_per_image(decided: Decided, tmp_path: Path) -> None:
    store = decided.store
    a, b, c, untouched = decided.review_items()[:4]
    store.override(a.event_id, Verdict.BLOCK, "mia")
    store.override(b.event_id, Verdict.ALLOW, "ada", note="a photo")
    store.override(c.event_id, Verdict.BLOCK, "mia")
    store.override(c.event_id, Verdict.ALLOW, "ada", note="second look")

    code, output = export(decided, tmp_path / "labels.csv")
    assert code == 0, output
    assert "3 labels (1 AI, 2 real; 1 with moderators disagreeing)" in output
    csv = pd.read_csv(tmp_path / "labels.csv").set_index("image_uri")
    assert set(csv.index) == {a.image_uri, b.image_uri, c.image_uri}
    assert untouched.image_uri not in csv.index
    assert csv.loc[a.image_uri, "ai_score"] == 1.0 and csv.loc[a.image_uri, "override_verdict"] == "block"
    assert (csv["verdict"] == csv["override_verdict"]).all()
    assert csv.loc[b.image_uri, "ai_score"] == 0.0 and csv.loc[b.image_uri, "moderator"] == "ada"
    assert csv.loc[c.image_uri, "ai_score"] == 0.0 and csv.loc[c.image_uri, "previous_verdict"] == "block"
    assert csv.loc[a.image_uri, "source"] == image_source(a) and csv.loc[a.image_uri, "group"] == a.item_id
    assert csv.loc[a.image_uri, "model_score"] == pytest.approx(a.ai_score)
    # every verdict stays: c was blocked by mia, then marked real by ada (the final label)
    assert list(csv.loc[c.image_uri, ["n_verdicts", "n_block", "n_allow", "n_agree"]]) == [2, 1, 1, 1]
    assert csv.loc[c.image_uri, "moderators"] == "mia;ada"
    assert csv.loc[c.image_uri, "final_verdict"] == "allow"
    votes = json.loads(str(csv.loc[c.image_uri, "verdicts"]))
    assert [(v["moderator"], v["verdict"]) for v in votes] == [("mia", "block"), ("ada", "allow")]
    assert votes[1]["note"] == "second look" and all(v["at"] for v in votes)
    assert list(csv.loc[a.image_uri, ["n_verdicts", "n_agree"]]) == [1, 1]

    code, output = export(decided, tmp_path / "verdicts.csv", "--per-verdict")
    assert code == 0 and "4 verdicts" in output, output
    long = pd.read_csv(tmp_path / "verdicts.csv")
    rows_c = long[long["image_uri"] == c.image_uri]
    assert rows_c["moderator"].tolist() == ["mia", "ada"] and rows_c["ai_score"].tolist() == [1.0, 0.0]
    assert (rows_c["final_label"] == 0.0).all() and (rows_c["final_verdict"] == "allow").all()
    assert csv.loc[a.image_uri, "model_version"] == a.model_version

    code, output = export(decided, tmp_path / "labels.parquet")
    assert code == 0, output
    parquet = pd.read_parquet(tmp_path / "labels.parquet").set_index("image_uri")
    assert parquet["ai_score"].to_dict() == csv["ai_score"].to_dict()
    assert parquet["at"].to_dict() == csv["at"].to_dict()

    code, output = export(decided, tmp_path / "labels.txt")
    assert code == 2 and ".parquet or .csv" in output


def test_review_scan_reads_the_queue_in_chunks_in_score_order(decided: Decided) -> None:
    store = decided.store
    want = [e for e, _ in store.review_queue(limit=1000)]
    rows = list(store.review_scan(chunk=3))
    assert [e for e, _ in rows] == want
    assert all(Decision.from_json(raw).event_id == e for e, raw in rows)
    assert [e for e, _ in store.review_scan(chunk=3, limit=4)] == want[:4]
    assert all(store.in_review(e) for e in want) and not store.in_review("nope")


def test_add_user_writes_an_argon2_hash_and_a_token_digest(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    base = ["review", "add-user", "zoe", "--users-file", str(path), "--password-stdin"]
    result = CliRunner().invoke(app, [*base, "--role", "admin", "--token"], input="zoe-secret-1\n")
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    stored = read_store(path)["zoe"]
    assert stored.role == Role.ADMIN and stored.hash.startswith("$argon2id$")
    assert "zoe-secret-1" not in path.read_text() and token not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0

    from worker.settings import Settings

    directory = Directory(Settings(home=tmp_path, review_users_file=path))
    assert directory.authenticate("zoe", "zoe-secret-1") == stored
    assert directory.authenticate("zoe", "zoe-secret-2") is None
    assert directory.by_token(token) == stored and directory.by_token(token + "x") is None

    result = CliRunner().invoke(app, base, input="zoe-secret-3\n")  # new password keeps the token
    assert result.exit_code == 0, result.output
    directory.refresh()
    assert directory.by_token(token) is not None and directory.authenticate("zoe", "zoe-secret-3")
    assert read_store(path)["zoe"].role == Role.MODERATOR

    assert CliRunner().invoke(app, [*base, "--role", "boss"], input="long-enough\n").exit_code == 2
    assert CliRunner().invoke(app, base, input="short\n").exit_code == 2


def test_review_command_serves_the_page(decided: Decided, tmp_path: Path) -> None:
    port = free_port()
    s = decided.settings
    cmd = [sys.executable, "-m", "worker", "review", "--port", str(port)]
    env = subprocess_env(
        REDIS_URL=s.redis_url or "", MODERATION_NAMESPACE=s.namespace, MODERATION_HOME=str(tmp_path)
    )
    log = tmp_path / "review.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/queue", follow_redirects=False, timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"ok": True}
    finally:
        proc.terminate()
        proc.wait(20)
    assert "no accounts yet" in log.read_text()
