"""Shared CLI helpers: the metrics endpoint's port error and the decision table's item column."""

from __future__ import annotations

import socket

import pytest
import typer

from worker.cli.common import decision_table, serve_metrics
from worker.ops.metrics import Metrics
from worker.records import Decision, Verdict


def test_a_taken_metrics_port_is_one_line_naming_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(typer.Exit) as caught:
            serve_metrics(Metrics().registry, port)
    assert caught.value.exit_code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith(f"error: metrics port {port} is already in use")
    assert "MODERATION_METRICS_PORT" in lines[0]


def test_the_item_column_is_the_full_item_id() -> None:
    from rich.console import Console

    uri = "s3://uploads/2026/12/01/a.jpg"
    d = Decision(
        item_id=uri, event_id="e1", image_uri=uri, verdict=Verdict.ALLOW, ai_score=0.1, model_version="v1"
    )
    console = Console(width=200, record=True)
    console.print(decision_table([d]))
    assert uri in console.export_text()
