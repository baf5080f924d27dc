"""Run ``moderation`` in this process, as a user would from a shell (typer's CliRunner)."""

from __future__ import annotations

from pathlib import Path


def invoke(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the CLI in this process (typer's CliRunner): same code path, none of a subprocess's import time."""
    import os

    from typer.testing import CliRunner

    from worker.cli.main import app

    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    finally:
        os.chdir(old)
    return result.exit_code, result.stdout, result.stderr
