"""Sentry: real sentry-sdk posting real envelopes over HTTP to a local endpoint used as the DSN."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, subprocess_env
from tests.ops.sentry_sink import parse_envelope, sentry_sink
from worker.ops.tracking import BREADCRUMB_CATEGORY


def _drive(sink_dsn: str | None, scenario: str, n_bad: int, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env.pop("SENTRY_DSN", None)
    env.pop("MODERATION_SENTRY_DSN", None)
    if sink_dsn:
        env["SENTRY_DSN"] = sink_dsn
    return subprocess.run(
        [sys.executable, "-m", "tests.ops.sentry_driver", scenario, str(n_bad), str(tmp)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ops_exception_becomes_exactly_one_event_with_ids(tmp_path: Path) -> None:
    with sentry_sink() as sink:
        proc = _drive(sink.dsn(), "crash", 0, tmp_path)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "sentry_enabled=True" in proc.stdout
        events = sink.events()
    assert len(events) == 1, [e.get("exception") for e in events]
    event = events[0]
    exc = event["exception"]["values"][-1]
    assert exc["type"] == "RuntimeError"
    assert "CUDA error" in exc["value"]
    assert event["tags"]["component"] == "worker"
    assert event["tags"]["event_id"] == "the-crash"
    assert event["tags"]["model_version"] == "v-test"


def test_ops_bad_images_send_no_event_but_ride_along_as_breadcrumbs(tmp_path: Path) -> None:
    with sentry_sink() as sink:
        quiet = _drive(sink.dsn(), "quiet", 50, tmp_path / "a")
        assert quiet.returncode == 0, quiet.stderr
        assert sink.events() == []
        # The same 50 bad images, then a real failure: one event carrying them as context.
        crash = _drive(sink.dsn(), "crash", 50, tmp_path / "b")
        assert crash.returncode != 0
        events = sink.events()
    assert len(events) == 1
    crumbs = [b for b in events[0]["breadcrumbs"]["values"] if b.get("category") == BREADCRUMB_CATEGORY]
    assert len(crumbs) == 50
    assert {c["data"]["event_id"] for c in crumbs} == {f"bad-{i}" for i in range(50)}
    assert {c["data"]["reason"] for c in crumbs} <= {"not_an_image", "truncated_image", "corrupt_image"}
    assert all(c["level"] == "warning" for c in crumbs)


def test_ops_without_dsn_sentry_stays_off(tmp_path: Path) -> None:
    with sentry_sink() as sink:
        proc = _drive(None, "crash", 3, tmp_path)
        assert proc.returncode != 0
        assert "sentry_enabled=False" in proc.stdout
        assert sink.envelopes == []


def test_ops_envelope_parser_reads_length_and_newline_items() -> None:
    body = b'{"event_id":"e1"}\n{"type":"event","length":13}\n{"level":"x"}\n{"type":"attachment"}\n{"a":1}\n'
    env = parse_envelope(body)
    assert env.header == {"event_id": "e1"}
    assert [h["type"] for h, _ in env.items] == ["event", "attachment"]
    assert env.items[0][1] == {"level": "x"}
    assert env.items[1][1] == {"a": 1}
