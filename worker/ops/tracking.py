"""Error tracking with Sentry: crashes become events, bad images only become breadcrumbs.

A bad upload (truncated JPEG, 404, decompression bomb) is the expected, per-item outcome of an ``error``
decision; it is counted in Prometheus and logged, and must not page anyone, so it is recorded as a
breadcrumb: the next real event (an exception in the worker) carries the last bad items as context.
Only exceptions that escape our code (a task failing, a thread dying, a model that cannot load) become
Sentry events. With no DSN configured nothing is initialised and every helper here is a cheap no-op.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import sentry_sdk
import structlog

from worker.records import Decision
from worker.settings import Settings

BREADCRUMB_CATEGORY = "moderation.item_error"
# Context fields copied from the structlog contextvars onto every Sentry event as tags.
_CONTEXT_TAGS = ("event_id", "item_id", "model_version", "task_id")


def init_sentry(settings: Settings, component: str) -> bool:
    """Initialise sentry-sdk for this process when ``SENTRY_DSN`` is set; returns whether it did.

    Call once per process at its edge (worker start, trainer start, review app start). The Celery
    integration reports task failures with the task's arguments and id; the logging integration keeps
    stdlib log lines as breadcrumbs but never turns a log line into an event, so per-item ``error`` lines
    cannot flood Sentry.
    """
    if not settings.sentry_dsn:
        return False
    from sentry_sdk.integrations.logging import LoggingIntegration

    integrations: list[Any] = [LoggingIntegration(level=None, event_level=None)]
    try:
        from sentry_sdk.integrations.celery import CeleryIntegration

        integrations.append(CeleryIntegration(monitor_beat_tasks=False))
    except Exception:  # celery not importable in a slim image: the rest still works
        pass
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        integrations=integrations,
        environment=os.environ.get("SENTRY_ENVIRONMENT", "production"),
        release=os.environ.get("SENTRY_RELEASE") or _package_version(),
        server_name=socket.gethostname(),
        traces_sample_rate=0.0,
        max_breadcrumbs=100,
        send_default_pii=False,
        before_send=_add_context_tags,
    )
    sentry_sdk.get_global_scope().set_tag("component", component)
    return True


def enabled() -> bool:
    return sentry_sdk.is_initialized()


def item_error_breadcrumb(decision: Decision) -> None:
    """Record one per-item ``error`` decision as a breadcrumb on the process-wide scope.

    The global scope is used because decisions are made in batcher threads while exceptions may surface
    in any thread; the breadcrumb must reach whichever event comes next. No-op without a DSN.
    """
    if not sentry_sdk.is_initialized():
        return
    reason = decision.reason.value if decision.reason is not None else "unknown"
    sentry_sdk.get_global_scope().add_breadcrumb(
        category=BREADCRUMB_CATEGORY,
        level="warning",
        type="default",
        message=f"{reason}: {(decision.detail or '')[:200]}",
        data={
            "event_id": decision.event_id,
            "item_id": decision.item_id,
            "image_uri": decision.image_uri[:500],
            "reason": reason,
            "model_version": decision.model_version,
        },
    )


def capture_exception(exc: BaseException) -> str | None:
    """Report an exception our code caught but cannot handle (e.g. a failed model reload)."""
    if not sentry_sdk.is_initialized():
        return None
    return sentry_sdk.capture_exception(exc)


def flush(timeout: float = 2.0) -> None:
    """Send what is queued; call before a process exits on purpose."""
    if sentry_sdk.is_initialized():
        sentry_sdk.flush(timeout=timeout)


def _add_context_tags(event: Any, _hint: Any) -> Any:
    ctx = structlog.contextvars.get_contextvars()
    tags = event.setdefault("tags", {})
    for key in _CONTEXT_TAGS:
        if key in ctx and key not in tags:
            tags[key] = str(ctx[key])
    return event


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"moderation@{version('moderation')}"
    except PackageNotFoundError:
        return None
