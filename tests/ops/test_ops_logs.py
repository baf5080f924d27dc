"""Logs: one JSON object per line off a terminal (ours and stdlib's alike), readable console on a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from worker.ops.logs import _QUIET, bind_event, bound, configure_logging, get_logger, resolve_format, unbind
from worker.settings import Settings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging is process-wide by design; put things back for the other tests."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {name: logging.getLogger(name).level for name in _QUIET}
    yield
    for name, lvl in named.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.configure(**config)
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_ops_auto_format_is_json_off_a_terminal_and_console_on_one(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, log_format="auto")
    assert resolve_format(settings, io.StringIO()) == "json"
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        assert resolve_format(settings, tty) == "console"
        configure_logging(settings, stream=tty, component="worker")
        get_logger("t").info("hello_console", item_id="x1")
        tty.flush()
        out = os.read(master, 65536).decode()
    os.close(master)
    assert "hello_console" in out
    assert "item_id" in out
    with pytest.raises(ValueError):
        json.loads(out.strip().splitlines()[0])
    assert resolve_format(Settings(home=tmp_path, log_format="console"), io.StringIO()) == "console"


def test_ops_json_lines_carry_bound_ids_from_our_code_and_stdlib(tmp_path: Path) -> None:
    buf = io.StringIO()
    configure_logging(Settings(home=tmp_path, log_format="json"), stream=buf, component="worker")
    log = get_logger("worker.test")
    tokens = bind_event("ev-1", item_id="item-1", model_version="v7", task_id="task-9")
    log.info("decided", verdict="allow")
    logging.getLogger("celery.worker.strategy").warning("Task %s received", "moderation.decide")
    unbind(tokens)
    with bound(event_id="ev-2", item_id=None):
        logging.getLogger("kombu").error("connection lost")
    log.info("after")
    rows = _lines(buf)
    assert [r["event"] for r in rows] == [
        "decided",
        "Task moderation.decide received",
        "connection lost",
        "after",
    ]
    assert all(r["component"] == "worker" and "timestamp" in r and "level" in r for r in rows)
    for row in rows[:2]:
        assert (row["event_id"], row["item_id"], row["model_version"], row["task_id"]) == (
            "ev-1",
            "item-1",
            "v7",
            "task-9",
        )
    assert rows[1]["logger"] == "celery.worker.strategy"
    assert rows[1]["level"] == "warning"
    assert rows[2]["event_id"] == "ev-2"
    assert "item_id" not in rows[2]
    assert "event_id" not in rows[3]


def test_ops_tracebacks_are_one_json_field_not_loose_lines(tmp_path: Path) -> None:
    buf = io.StringIO()
    configure_logging(Settings(home=tmp_path, log_format="json"), stream=buf)
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger().exception("ours_failed")
        logging.getLogger("celery.app.trace").exception("Task failed")
    rows = _lines(buf)
    assert len(rows) == 2
    for row in rows:
        assert "ValueError: boom" in row["exception"]
        assert row["level"] == "error"


def test_ops_level_filters_and_reconfigure_does_not_stack_handlers(tmp_path: Path) -> None:
    buf = io.StringIO()
    s = Settings(home=tmp_path, log_format="json", log_level="WARNING")
    configure_logging(s, stream=buf)
    configure_logging(s, stream=buf)
    get_logger().info("dropped")
    logging.getLogger("x").info("dropped too")
    get_logger().warning("kept")
    logging.getLogger("x").warning("kept too")
    assert [r["event"] for r in _lines(buf)] == ["kept", "kept too"]


def test_ops_lines_from_many_threads_never_interleave(tmp_path: Path) -> None:
    buf = io.StringIO()
    configure_logging(Settings(home=tmp_path, log_format="json"), stream=buf)

    def work(n: int) -> None:
        log = get_logger()
        for i in range(200):
            if i % 2:
                log.info("ours", n=n, i=i, pad="x" * 200)
            else:
                logging.getLogger("lib").info("theirs %d %d %s", n, i, "y" * 200)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_lines(buf)) == 800


def test_ops_default_stream_follows_sys_stderr_even_after_it_was_swapped_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test runners (and CliRunner) swap and close sys.stderr; logging must write to the current one."""
    configure_logging(Settings(home=tmp_path, log_format="json"), component="x")
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    get_logger().info("ours")
    logging.getLogger("lib").warning("theirs")
    assert [r["event"] for r in _lines(first)] == ["ours", "theirs"]
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    get_logger().info("after close")
    logging.getLogger("lib").warning("still fine")
    assert [r["event"] for r in _lines(second)] == ["after close", "still fine"]


def test_ops_celery_per_task_chatter_is_quiet_at_info_but_failures_and_debug_come_through(
    tmp_path: Path,
) -> None:
    buf = io.StringIO()
    configure_logging(Settings(home=tmp_path, log_format="json", log_level="INFO"), stream=buf)
    trace = logging.getLogger("celery.app.trace")
    trace.info("Task moderation.decide[1] succeeded in 0.01s: None")
    trace.error("Task moderation.decide[2] raised unexpected: RuntimeError()")
    logging.getLogger("celery.worker.consumer.connection").info("Connected to redis://")
    assert [r["event"] for r in _lines(buf)] == [
        "Task moderation.decide[2] raised unexpected: RuntimeError()",
        "Connected to redis://",
    ]
    debug = io.StringIO()
    configure_logging(Settings(home=tmp_path, log_format="json", log_level="DEBUG"), stream=debug)
    trace.info("Task moderation.decide[3] succeeded in 0.01s: None")
    assert [r["event"] for r in _lines(debug)] == ["Task moderation.decide[3] succeeded in 0.01s: None"]
