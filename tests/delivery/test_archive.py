"""The archive: every decision, override and audit entry in Parquet exactly once, across kill -9 and restarts.

Decisions are written with the real DecisionStore into a real Redis; the archiver runs as a real
``moderation archive`` process; S3 is moto's server over HTTP.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import run_cli, subprocess_env
from tests.streams import stream_entries
from tests.waiting import eventually
from training.labels import override_from_fields
from worker.delivery.archive import (
    DECISIONS,
    Archiver,
    audit_overrides,
    latest_decisions,
    open_target,
    part_name,
    partition_of,
    read_archive,
    row_of,
    to_parquet,
)
from worker.delivery.store import DecisionStore
from worker.records import Decision, Verdict
from worker.settings import Settings


def decisions(start: int, n: int) -> list[Decision]:
    verdicts = [Verdict.ALLOW, Verdict.REVIEW, Verdict.BLOCK, Verdict.ERROR]
    return [
        Decision(
            item_id=f"item-{i}",
            event_id=f"ev-{i}",
            image_uri=f"s3://uploads/{i}.jpg",
            verdict=verdicts[i % 4],
            ai_score=None if i % 4 == 3 else (i % 100) / 100,
            model_version="v1",
        )
        for i in range(start, start + n)
    ]


def group_state(client: redis.Redis, key: str, group: str = "archive") -> dict[str, int]:
    for g in client.xinfo_groups(key):
        if g["name"] == group:
            return {"pending": int(g["pending"]), "lag": int(g.get("lag") or 0)}
    return {"pending": -1, "lag": -1}


def start_archiver(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "archive", "run", *args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def assert_exactly_once(df, expected_event_ids: set[str]) -> None:  # type: ignore[no-untyped-def]
    rows = df[df["kind"] == "decision"]
    assert len(rows) == len(expected_event_ids)
    assert set(rows["event_id"]) == expected_event_ids
    assert rows["stream_id"].is_unique


def test_kill_9_mid_way_and_restart_archives_every_decision_once(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    root = tmp_path / "archive"
    env = subprocess_env(
        REDIS_URL=redis_url,
        MODERATION_ARCHIVE_URI=str(root),
        MODERATION_ARCHIVE_CONSUMER="archiver-1",
        MODERATION_LOG_LEVEL="WARNING",
    )
    log = tmp_path / "archiver.log"
    written: set[str] = set()
    for round_ in range(3):
        parts_before = len(list(root.rglob("*.parquet")))
        proc = start_archiver(env, log, "--batch", "50", "--flush-s", "0.05")
        # decisions arrive while the archiver runs; it is killed while more are still coming in
        for chunk in range(6):
            batch = decisions(round_ * 600 + chunk * 100, 100)
            store.write_many(batch)
            written.update(d.event_id for d in batch)
            time.sleep(0.05)

        def new_part(before: int = parts_before) -> bool:
            return len(list(root.rglob("*.parquet"))) > before

        eventually(new_part, "this run's first part", 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    before = group_state(client, store.keys.decisions)
    assert before["pending"] + before["lag"] > 0, "every kill came after the last entry: nothing was tested"

    proc = start_archiver(env, log, "--batch", "50", "--flush-s", "0.05")
    eventually(
        lambda: group_state(client, store.keys.decisions) == {"pending": 0, "lag": 0},
        "the restarted archiver to catch up",
        60,
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]

    df = read_archive(root)
    assert_exactly_once(df, written)
    for tmp in root.rglob(".*.tmp"):  # a write killed half-way: invisible to readers, removed once old
        assert tmp.name.startswith(".decisions-") or tmp.name.startswith(".overrides-")


def test_crash_between_write_and_ack_writes_nothing_twice(redis_url: str, tmp_path: Path) -> None:
    """The state a crash leaves (part on disk, entries unacked, held by a consumer that is gone) is
    reproduced with the archiver's own steps; a fresh archiver takes the entries over and skips them."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    root = tmp_path / "archive"
    store.write_many(decisions(0, 300))
    dead = Archiver(client, open_target(str(root)), consumer="dead-replica", batch=1000)
    dead.ensure_groups()
    got = dead.read_new(120, None)[DECISIONS]  # delivered to the dead replica ...
    first, last = got[0][0], got[-1][0]
    rows = [row_of(DECISIONS, sid, fields) for sid, fields in got]
    dead.target.put(partition_of(first), part_name(DECISIONS, first, last), to_parquet(rows))  # ... written
    assert group_state(client, store.keys.decisions)["pending"] == 120  # ... never acked

    result = run_cli(
        "archive",
        "once",
        REDIS_URL=redis_url,
        MODERATION_ARCHIVE_URI=str(root),
        MODERATION_ARCHIVE_CLAIM_IDLE_S="0.01",
    )
    assert result.returncode == 0, result.stderr
    assert "archived 180 entr(ies)" in result.stdout and "120 already archived" in result.stdout
    assert group_state(client, store.keys.decisions) == {"pending": 0, "lag": 0}
    assert_exactly_once(read_archive(root), {f"ev-{i}" for i in range(300)})


def test_reader_drops_rows_of_overlapping_parts(redis_url: str, tmp_path: Path) -> None:
    """Two parts over the same entries (a copied folder, a reset group): the reader still sees each once."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    store.write_many(decisions(0, 40))
    entries = stream_entries(client, store.keys.decisions)
    target = open_target(str(tmp_path / "archive"))
    for a, b in [(0, 30), (10, 40)]:
        chunk = entries[a:b]
        rows = [row_of(DECISIONS, sid, f) for sid, f in chunk]
        target.put(
            partition_of(chunk[0][0]), part_name(DECISIONS, chunk[0][0], chunk[-1][0]), to_parquet(rows)
        )
    df = read_archive(tmp_path / "archive")
    assert_exactly_once(df, {f"ev-{i}" for i in range(40)})
    assert list(df["stream_id"]) == [sid for sid, _ in entries]  # oldest first


def test_overrides_and_their_audit_entries_are_archived(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    store.write_many(decisions(0, 20))
    store.override("ev-1", Verdict.BLOCK, "ann", note="same seed as a known generator")
    store.override("ev-1", Verdict.ALLOW, "bob", note="camera original")
    store.override("ev-5", Verdict.ALLOW, "ann")
    client.xadd(store.keys.decisions, {"event_id": "ev-x", "decision": "{not json"})  # kept, never dropped
    root = tmp_path / "archive"
    result = run_cli("archive", "once", REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root))
    assert result.returncode == 0, result.stderr

    df = read_archive(root)
    assert df["kind"].value_counts().to_dict() == {"decision": 20, "override": 3, "audit": 3, "unparsed": 1}
    overrides = df[df["kind"] == "override"]
    assert list(overrides["event_id"]) == ["ev-1", "ev-1", "ev-5"]
    assert list(overrides["moderator"]) == ["ann", "bob", "ann"]
    audit = df[df["kind"] == "audit"]
    assert list(audit["previous_verdict"]) == ["review", "block", "review"]
    assert audit["note"].iloc[0] == "same seed as a known generator"
    assert df[df["kind"] == "unparsed"]["record"].iloc[0] == '{"decision": "{not json", "event_id": "ev-x"}'

    now = latest_decisions(df).set_index("event_id")["verdict"]
    assert now["ev-1"] == "allow" and now["ev-5"] == "allow" and now["ev-2"] == "block"
    labels = [override_from_fields(r) for r in audit_overrides(df)]
    assert [(o.image_uri, o.target, o.moderator) for o in labels if o] == [
        ("s3://uploads/1.jpg", 1.0, "ann"),
        ("s3://uploads/1.jpg", 0.0, "bob"),
        ("s3://uploads/5.jpg", 0.0, "ann"),
    ]
    assert read_archive(root, kinds=["audit"])["kind"].unique().tolist() == ["audit"]


def test_sigterm_writes_what_is_buffered_then_exits(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    root = tmp_path / "archive"
    env = subprocess_env(
        REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root), MODERATION_ARCHIVE_CLAIM_IDLE_S="7200"
    )
    proc = start_archiver(env, tmp_path / "archiver.log", "--flush-s", "3600")
    store.write_many(decisions(0, 250))
    eventually(lambda: group_state(client, store.keys.decisions)["pending"] == 250, "entries buffered", 60)
    assert not list(root.rglob("*.parquet"))  # held, not written: the flush interval is an hour
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "archiver.log").read_text()[-3000:]
    assert group_state(client, store.keys.decisions) == {"pending": 0, "lag": 0}
    assert_exactly_once(read_archive(root), {f"ev-{i}" for i in range(250)})


def test_s3_target_with_a_crash_between_write_and_ack(
    redis_url: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    uri = f"s3://{s3_bucket}/moderation/archive"
    settings = Settings(s3_endpoint_url=s3_endpoint, home=tmp_path / "home")
    store.write_many(decisions(0, 200))
    store.override("ev-7", Verdict.BLOCK, "ann")
    env = {"REDIS_URL": redis_url, "MODERATION_ARCHIVE_URI": uri, "MODERATION_S3_ENDPOINT_URL": s3_endpoint}

    # a crashed run: its first part is on S3, its entries were never acked, its consumer is this one
    crashed = Archiver(client, open_target(uri, settings), consumer="archive-ci", batch=1000)
    crashed.ensure_groups()
    got = crashed.read_new(80, None)[DECISIONS]
    rows = [row_of(DECISIONS, sid, f) for sid, f in got]
    crashed.target.put(partition_of(got[0][0]), part_name(DECISIONS, got[0][0], got[-1][0]), to_parquet(rows))

    result = run_cli("archive", "once", env=subprocess_env(MODERATION_ARCHIVE_CONSUMER="archive-ci", **env))
    assert result.returncode == 0, result.stderr
    assert "80 already archived" in result.stdout
    store.write_many(decisions(200, 50))
    assert run_cli("archive", "once", env=subprocess_env(**env)).returncode == 0

    df = read_archive(uri, settings)
    assert_exactly_once(df, {f"ev-{i}" for i in range(250)})
    assert (df["kind"] == "override").sum() == 1 and (df["kind"] == "audit").sum() == 1
    import boto3

    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(
            Bucket=s3_bucket, Prefix="moderation/archive/"
        )["Contents"]
    ]
    assert all(k.split("/")[2].startswith("date=") and k.split("/")[3].startswith("hour=") for k in keys), (
        keys
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODERATION_ARCHIVE_URI": "ftp://host/x"}, "must be a folder or s3://bucket/prefix"),
        ({}, "no archive configured: set MODERATION_ARCHIVE_URI"),
        ({"MODERATION_ARCHIVE_URI": "s3://"}, "s3 URI without a bucket"),
    ],
)
def test_configuration_mistakes_are_one_line_errors(
    redis_url: str, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    result = run_cli(
        "archive",
        "once",
        cwd=tmp_path,
        env=subprocess_env(**{"REDIS_URL": redis_url, "MODERATION_ARCHIVE_URI": "", **env}),
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_stream_retention_trims_only_what_every_group_acked(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    store.write_many(decisions(0, 100))
    ids = [sid for sid, _ in stream_entries(client, store.keys.decisions)]
    client.xgroup_create(store.keys.decisions, "pipeline", id="0")  # the upload pipeline, behind
    client.xreadgroup("pipeline", "p1", {store.keys.decisions: ">"}, count=50)
    client.xack(store.keys.decisions, "pipeline", *ids[:40])
    env = {"REDIS_URL": redis_url, "MODERATION_ARCHIVE_URI": str(tmp_path / "archive")}

    result = run_cli("archive", "once", env=subprocess_env(MODERATION_ARCHIVE_STREAM_RETENTION_S="0", **env))
    assert result.returncode == 0, result.stderr
    assert "40 trimmed" in result.stdout
    assert [sid for sid, _ in stream_entries(client, store.keys.decisions)] == ids[
        40:
    ]  # 40..49 pending there

    kept = subprocess_env(MODERATION_ARCHIVE_STREAM_RETENTION_S="3600", **env)
    assert run_cli("archive", "once", env=kept).returncode == 0
    client.xack(store.keys.decisions, "pipeline", *ids[40:50])
    assert client.xlen(store.keys.decisions) == 60  # within the retention: kept
    assert run_cli("archive", "once", env=subprocess_env(**env)).returncode == 0
    assert client.xlen(store.keys.decisions) == 60  # unset: never trimmed by the archiver
    assert_exactly_once(read_archive(tmp_path / "archive"), {f"ev-{i}" for i in range(100)})


def test_unwritable_targets_fail_in_one_line_and_lose_nothing(
    redis_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    store.write_many(decisions(0, 30))
    (tmp_path / "a-file").write_text("not a folder")
    for uri in [str(tmp_path / "a-file" / "archive"), "s3://no-such-bucket/archive"]:
        result = run_cli(
            "archive",
            "once",
            REDIS_URL=redis_url,
            MODERATION_ARCHIVE_URI=uri,
            MODERATION_S3_ENDPOINT_URL=s3_endpoint,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "cannot write to" in result.stderr and "Traceback" not in result.stderr
    assert (
        group_state(client, store.keys.decisions)["lag"]
        + group_state(client, store.keys.decisions)["pending"]
        == 30
    )  # nothing acknowledged
    root = tmp_path / "archive"
    assert run_cli("archive", "once", REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root)).returncode == 0
    assert_exactly_once(read_archive(root), {f"ev-{i}" for i in range(30)})
    status = run_cli("archive", "status", REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root))
    assert status.returncode == 0 and "decisions\t0 not yet archived" in status.stdout


def test_redis_unreachable_is_a_one_line_error(tmp_path: Path) -> None:
    from worker.process.localredis import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli("archive", "once", REDIS_URL=url, MODERATION_ARCHIVE_URI=str(tmp_path / "a"))
    assert result.returncode == 2
    assert "Redis unreachable" in result.stderr and "Traceback" not in result.stderr


def test_run_retries_a_failing_target_and_two_archivers_share_the_work(
    redis_url: str, tmp_path: Path
) -> None:
    """The folder cannot be created at first (its parent is a file); both archivers retry, and once it can,
    they split the stream between them: each decision still lands in exactly one part."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    blocker = tmp_path / "mnt"
    blocker.write_text("the volume is not mounted yet")
    root = blocker / "archive"
    logs = [tmp_path / "a1.log", tmp_path / "a2.log"]
    procs = [
        start_archiver(
            subprocess_env(
                REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root), MODERATION_ARCHIVE_CONSUMER=name
            ),
            log,
            "--batch",
            "100",
            "--flush-s",
            "0.1",
        )
        for name, log in zip(["arch-a", "arch-b"], logs, strict=True)
    ]
    store.write_many(decisions(0, 1000))
    eventually(lambda: all("archive_retry" in log.read_text() for log in logs), "both to retry", 60)
    assert (
        group_state(client, store.keys.decisions)["lag"]
        + group_state(client, store.keys.decisions)["pending"]
        == 1000
    )
    blocker.unlink()
    store.write_many(decisions(1000, 1000))
    eventually(
        lambda: group_state(client, store.keys.decisions) == {"pending": 0, "lag": 0},
        "both archivers to catch up",
        60,
    )
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=30) for proc in procs] == [0, 0]
    consumers = {c["name"] for c in client.xinfo_consumers(store.keys.decisions, "archive")}
    assert consumers == {"arch-a", "arch-b"}
    assert_exactly_once(read_archive(root), {f"ev-{i}" for i in range(2000)})


def test_entries_land_in_the_hour_redis_appended_them_and_readers_pick_hours(
    redis_url: str, tmp_path: Path
) -> None:
    """A batch that straddles midnight UTC is split into one part per hour; since/until read only those."""
    from datetime import UTC, datetime

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    hours = [datetime(2026, 11, 30, 23, 59, 59, 999000, tzinfo=UTC), datetime(2026, 12, 1, 0, 0, tzinfo=UTC)]
    for i, d in enumerate(decisions(0, 6)):  # as Redis stamps them: three before midnight, three after
        ms = int(hours[i // 3].timestamp() * 1000)
        client.xadd(store.keys.decisions, {"event_id": d.event_id, "decision": d.to_json()}, id=f"{ms}-{i}")
    root = tmp_path / "archive"
    assert run_cli("archive", "once", REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root)).returncode == 0
    assert sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("*.parquet")) == [
        "date=2026-11-30/hour=23",
        "date=2026-12-01/hour=00",
    ]
    assert set(read_archive(root, until=hours[0])["event_id"]) == {"ev-0", "ev-1", "ev-2"}
    assert set(read_archive(root, since=hours[1])["event_id"]) == {"ev-3", "ev-4", "ev-5"}
    assert len(read_archive(root, since=hours[0], until=hours[1])) == 6


def test_run_refuses_a_claim_time_shorter_than_two_flush_intervals(redis_url: str, tmp_path: Path) -> None:
    result = run_cli(
        "archive", "run", "--flush-s", "200", REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(tmp_path / "a")
    )
    assert result.returncode == 2
    assert "must be at least twice" in result.stderr and "Traceback" not in result.stderr


def test_a_half_written_temp_file_is_invisible_and_cleaned_once_old(redis_url: str, tmp_path: Path) -> None:
    import os

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = DecisionStore(client)
    store.write_many(decisions(0, 10))
    root = tmp_path / "archive"
    assert run_cli("archive", "once", REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root)).returncode == 0
    folder = next(root.rglob("*.parquet")).parent
    old, fresh = folder / ".decisions-1-0_2-0.parquet.1.tmp", folder / ".decisions-3-0_4-0.parquet.2.tmp"
    for tmp in (old, fresh):
        tmp.write_bytes(b"PAR1 half a part")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert_exactly_once(read_archive(root), {f"ev-{i}" for i in range(10)})
    assert run_cli("archive", "once", REDIS_URL=redis_url, MODERATION_ARCHIVE_URI=str(root)).returncode == 0
    assert not old.exists() and fresh.exists()
