"""structlog configuration, done once at the edge (CLI entry, worker process start), never at import.

One pipeline for every line a process writes: our own ``structlog`` calls and records of the standard
``logging`` module (Celery, kombu, uvicorn, botocore) are rendered by the same processors, so a log shipper
sees one JSON object per line and never a stray plain-text traceback. In a terminal the same lines are
rendered for humans. Context (``event_id``, ``item_id``, ``model_version``, task id) lives in contextvars, so
it follows the work through helper functions without being passed around.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.settings import Settings

# Loggers that are chatty at INFO and add nothing an on-call engineer needs. Celery's two per-task lines
# ("received", "succeeded") would triple the lines per event and repeat what our "decided" line says (with
# the task id bound); a stdlib line costs about twice a structlog line (docs/benchmarks.md, Ops). Their
# warnings and errors (a task that failed) still come through; MODERATION_LOG_LEVEL=DEBUG shows everything.
_QUIET = {
    "botocore": logging.WARNING,
    "boto3": logging.WARNING,
    "urllib3": logging.WARNING,
    "celery.worker.strategy": logging.WARNING,
    "celery.app.trace": logging.WARNING,
}


def resolve_format(settings: Settings, stream: TextIO | None = None) -> str:
    """``auto`` means console for a human at a terminal and JSON for everything else (pipes, files)."""
    if settings.log_format != "auto":
        return settings.log_format
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def _static_fields(fields: dict[str, str]) -> Processor:
    def add(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def configure_logging(
    settings: Settings, *, component: str | None = None, stream: TextIO | None = None
) -> None:
    """JSON lines for machines, coloured console for a terminal; stdlib logging goes the same way.

    ``component`` (worker, trainer, review) is added to every line so one log index can hold them all.
    Safe to call again (a test, or Celery's ``setup_logging`` signal): it replaces, never stacks, handlers.
    """
    out = stream or sys.stderr
    fmt = resolve_format(settings, out)
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=getattr(out, "isatty", lambda: False)())
    )
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        level = logging.INFO
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if component:
        shared.append(_static_fields({"component": component}))
    # JSON wants tracebacks as a string field; the console renderer prints them prettily itself.
    tail: list[Processor] = [structlog.processors.StackInfoRenderer()]
    if fmt == "json":
        tail.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # WriteLogger writes message and newline in one call, so lines from threads never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=stream) if stream else _current_stderr_logger,
        cache_logger_on_first_use=False,
    )
    _route_stdlib(stream, shared, tail, renderer, level)


def _current_stderr_logger(*_: Any) -> structlog.WriteLogger:
    """Write to whatever ``sys.stderr`` is when the line is logged (test runners swap and close it)."""
    return structlog.WriteLogger(sys.stderr)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """A stream handler that follows ``sys.stderr`` instead of keeping the one it was created with."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


def _route_stdlib(
    stream: TextIO | None, shared: list[Processor], tail: list[Processor], renderer: Processor, level: int
) -> None:
    """Send every standard-library log record through the structlog processors (one format per process)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
    )
    handler: logging.Handler = logging.StreamHandler(stream) if stream else _StderrHandler()
    handler.setFormatter(formatter)
    handler.set_name("moderation")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(level if level < logging.INFO else max(quiet, level))
    # Celery and others attach their own handlers to named loggers; let records reach the root instead.
    for name in ("celery", "celery.task", "celery.worker", "celery.redirected", "kombu", "uvicorn"):
        lg = logging.getLogger(name)
        for old in list(lg.handlers):
            lg.removeHandler(old)
        lg.propagate = True
    logging.captureWarnings(True)


def install_celery_logging(settings: Settings, component: str = "worker") -> None:
    """Keep a Celery worker's output on the structlog pipeline: one JSON object per line, always.

    Celery skips its own logging set-up (plain-text format) when a receiver is connected to
    ``setup_logging``; ours configures the structlog pipeline instead. Celery also prints its shutdown
    banners ("worker: Warm shutdown (MainProcess)") straight to the stdout file descriptor; once the worker
    is ready we re-install its own signal handlers without the banner and log a structured line instead.
    Call before the worker starts.
    """
    from celery import signals

    def _setup(**_: Any) -> None:
        configure_logging(settings, component=component)

    signals.setup_logging.connect(_setup, weak=False)
    signals.worker_ready.connect(_structured_shutdown_messages, weak=False)


def _structured_shutdown_messages(sender: Any = None, **_: Any) -> None:
    from celery.apps import worker as celery_worker
    from celery.platforms import EX_FAILURE

    controller = getattr(sender, "controller", None)
    if controller is None:
        return
    log = get_logger("worker.shutdown")

    def on_term(_: Any) -> None:
        log.warning("shutdown_requested", how="warm", signal="SIGTERM", hint="finishing in-flight events")

    def on_int(w: Any) -> None:
        log.warning("shutdown_requested", how="warm", signal="SIGINT", hint="again for a cold shutdown")
        celery_worker.install_worker_term_hard_handler(w, sig="SIGINT", verbose=False)

    try:
        celery_worker.install_worker_term_handler(controller, callback=on_term, verbose=False)
        celery_worker.install_worker_int_handler(
            controller, callback=on_int, exitcode=EX_FAILURE, verbose=False
        )
    except (ValueError, AttributeError, TypeError):  # not the main thread, or another Celery layout
        log.debug("shutdown_banners_left_as_is")


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger; ``name`` shows up as ``logger`` like stdlib records do."""
    log = structlog.get_logger()
    if name is not None:
        initial = {"logger": name, **initial}
    return log.bind(**initial) if initial else log


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Bind fields to every log line written inside the block (and Sentry events captured there)."""
    clean = {k: v for k, v in fields.items() if v is not None}
    with structlog.contextvars.bound_contextvars(**clean):
        yield


def bind_event(
    event_id: str, item_id: str | None = None, model_version: str | None = None, task_id: str | None = None
) -> Any:
    """Bind the ids an on-call engineer greps for; returns tokens for :func:`unbind`."""
    fields = {"event_id": event_id, "item_id": item_id, "model_version": model_version, "task_id": task_id}
    return structlog.contextvars.bind_contextvars(**{k: v for k, v in fields.items() if v is not None})


def unbind(tokens: Any) -> None:
    structlog.contextvars.reset_contextvars(**tokens)
