"""User mistakes end in one line on stderr and a meaningful exit status, never a traceback.

Each row is a mistake a new user makes, run as a real ``moderation`` subprocess without a terminal (stdin
closed), as a script or CI job runs it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, subprocess_env
from worker.process.localredis import free_port


@dataclass(frozen=True)
class Ctx:
    tmp: Path
    checkpoint: Path
    image: Path
    redis_url: str
    busy_port: int


@dataclass(frozen=True)
class Case:
    name: str
    args: Callable[[Ctx], list[str]]
    code: int
    says: tuple[str, ...] = ()  # substrings of the one error line (or of stdout when code == 0)
    env: Callable[[Ctx], dict[str, str]] = field(default=lambda c: {})
    needs_no_gpu: bool = False


CASES = [
    Case(
        "redis down on submit",
        lambda c: ["submit", str(c.image)],
        1,
        ("cannot reach Redis", "REDIS_URL"),
        env=lambda c: {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
    ),
    Case(
        "metrics port in use",
        lambda c: ["worker", "--checkpoint", str(c.checkpoint), "--metrics-port", str(c.busy_port)],
        1,
        ("already in use", "port"),
        env=lambda c: {"REDIS_URL": c.redis_url, "MODERATION_DEVICE": "cpu"},
    ),
    Case(
        "a list setting given as one plain value just works",
        lambda c: ["score", "--checkpoint", str(c.checkpoint), "--device", "cpu", str(c.image)],
        0,
        ("allow",),
        env=lambda c: {"MODERATION_HTTPS_ALLOW_HOSTS": "cdn.example.com"},
    ),
    Case(
        "a list setting given comma-separated just works",
        lambda c: ["score", "--checkpoint", str(c.checkpoint), "--device", "cpu", str(c.image)],
        0,
        ("allow",),
        env=lambda c: {"MODERATION_ALLOWED_FORMATS": "JPEG, PNG"},
    ),
    Case(
        "a number setting that is not a number names the variable",
        lambda c: ["score", "--checkpoint", str(c.checkpoint), str(c.image)],
        2,
        ("MODERATION_MAX_BATCH='abc'", "integer", "fix:"),
        env=lambda c: {"MODERATION_MAX_BATCH": "abc"},
    ),
    Case(
        "a JSON setting that is not JSON names the variable",
        lambda c: ["score", "--checkpoint", str(c.checkpoint), str(c.image)],
        2,
        ("MODERATION_REVIEW_USERS", "JSON"),
        env=lambda c: {"MODERATION_REVIEW_USERS": "{alice"},
    ),
    Case(
        "a choice setting outside its choices",
        lambda c: ["score", "--checkpoint", str(c.checkpoint), str(c.image)],
        2,
        ("MODERATION_LOG_FORMAT='xml'", "'json'"),
        env=lambda c: {"MODERATION_LOG_FORMAT": "xml"},
    ),
    Case(
        "--device cuda without a GPU",
        lambda c: ["score", "--device", "cuda", "--checkpoint", str(c.checkpoint), str(c.image)],
        2,
        ("cuda", "--device cpu"),
        needs_no_gpu=True,
    ),
    Case(
        "worker --device cuda without a GPU",
        lambda c: ["worker", "--device", "cuda", "--checkpoint", str(c.checkpoint)],
        2,
        ("cuda", "--device cpu"),
        env=lambda c: {"REDIS_URL": c.redis_url},
        needs_no_gpu=True,
    ),
    Case(
        "score with inputs that failed exits non-zero and says how many",
        lambda c: ["score", "--checkpoint", str(c.checkpoint), "--device", "cpu", str(c.image), "nope.png"],
        1,
        ("1 of 2 input(s) failed", "file_not_found: 1"),
    ),
    Case(
        "review add-user without a terminal",
        lambda c: ["review", "add-user", "alice", "--users-file", str(c.tmp / "users.json")],
        2,
        ("no terminal", "--password-stdin", "--password-file"),
    ),
    Case(
        "review add-user with --password-file",
        lambda c: [
            "review",
            "add-user",
            "alice",
            "--users-file",
            str(c.tmp / "users.json"),
            "--password-file",
            str(c.tmp / "password.txt"),
        ],
        0,
        ("added", "alice"),
    ),
    Case("--version", lambda c: ["--version"], 0, ("moderation ",)),
]


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def ctx(tmp_path: Path, tiny_checkpoint: Path, redis_url: str, busy_port: int) -> Ctx:
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((80, 96, 3), 127, dtype=np.uint8)).save(image)
    (tmp_path / "password.txt").write_text("correct horse battery\n")
    return Ctx(tmp_path, tiny_checkpoint, image, redis_url, busy_port)


def error_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines of the program's own logging."""
    return [line for line in stderr.splitlines() if line.strip() and not line.lstrip().startswith("{")]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_mistake_gives_one_line_and_its_exit_code(case: Case, ctx: Ctx) -> None:
    if case.needs_no_gpu:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has a GPU")
    proc = run_cli(
        *case.args(ctx),
        cwd=ctx.tmp,
        timeout=180,
        # a narrow terminal must not wrap the error line
        env=subprocess_env(MODERATION_HOME=str(ctx.tmp / "home"), COLUMNS="60", **case.env(ctx)),
    )
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == case.code, out
    if case.code == 0:
        assert all(s in proc.stdout for s in case.says), proc.stdout
        return
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for s in case.says:
        assert s in lines[0], lines[0]


# --- help text: every option described, an example under every command ----------------------------------
# Training commands document their own options (training/cli.py).
_TRAINING = {"train", "probe", "evaluate", "gate"}


def _commands(command: object, path: str = "") -> Iterator[tuple[str, object]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, f"{path} {name}".strip())


def test_cli_every_command_has_an_example_and_every_option_a_description() -> None:
    from worker.cli.main import build_command

    undescribed, no_example = [], []
    for path, command in _commands(build_command()):
        if not (getattr(command, "epilog", None) or "").startswith("Examples:"):
            no_example.append(path or "moderation")
        if path in _TRAINING:
            continue
        for p in getattr(command, "params", []):
            if p.param_type_name == "option" and not p.help and not p.hidden:
                undescribed.append(f"{path} --{p.name}")
    assert no_example == []
    assert undescribed == []


def test_cli_help_shows_the_example() -> None:
    proc = run_cli("submit", "--help", COLUMNS="120")
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "moderation submit --wait" in proc.stdout
