"""The ``moderation`` command as a user runs it: a real subprocess, real files, real output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import run_cli, subprocess_env
from worker.records import Decision, Verdict
from worker.samples import sample_labels, sample_paths


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=180, env=subprocess_env(**env))


def test_checkpoint_init_then_score_samples_as_json(tmp_path: Path) -> None:
    init = run("checkpoint", "init", "--arch", "test_convnext", "--out", "ck", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "ck" / "manifest.json").is_file()

    out = run("score", "--checkpoint", "ck", "--samples", "--json", "nope.jpg", cwd=tmp_path)
    assert out.returncode == 1, out.stderr  # every decision printed, and the failed input in the status
    assert "1 of" in out.stderr and "file_not_found: 1" in out.stderr
    decisions = [Decision.from_json(line) for line in out.stdout.splitlines()]
    assert len(decisions) == len(sample_paths()) + 1 == len(sample_labels()) + 1
    assert decisions[0].verdict == Verdict.ERROR and decisions[0].reason is not None
    assert all(d.verdict != Verdict.ERROR for d in decisions[1:])

    table = run("score", "--checkpoint", "ck", str(sample_paths()[0]), cwd=tmp_path, COLUMNS="200")
    assert table.returncode == 0, table.stderr
    assert sample_paths()[0].name in table.stdout and "verdict" in table.stdout


def test_missing_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    out = run("score", "x.jpg", cwd=tmp_path, MODERATION_HOME=str(tmp_path / "home"))
    assert out.returncode == 2
    assert "no checkpoint" in out.stderr and "checkpoint init" in out.stderr
    assert "Traceback" not in out.stderr


def test_checkpoint_show_verifies_and_prints_the_manifest(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = run("checkpoint", "show", str(tiny_checkpoint), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["arch"] == "test_convnext" and len(manifest["weights_sha256"]) == 64


def test_help_everywhere(tmp_path: Path) -> None:
    """The installed entry point answers ``--help``; every command and group of the command it builds does too
    (rendered by click's runner on that same command: one process start, not one per command)."""
    out = run("--help", cwd=tmp_path)
    assert out.returncode == 0 and "Usage" in out.stdout, out.stderr

    from click.testing import CliRunner

    from worker.cli.main import build_command

    root = build_command()
    paths: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    assert ["score"] in paths and ["checkpoint", "init"] in paths
    runner = CliRunner()
    for path in paths:
        got = runner.invoke(root, [*path, "--help"], prog_name="moderation")
        assert got.exit_code == 0 and "Usage: moderation" in got.output, (path, got.output, got.exception)
