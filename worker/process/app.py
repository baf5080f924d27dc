"""The Celery program: queues, the one task, and every setting that affects delivery, explained in one place.

Delivery guarantees we want and the setting that gives each:

* ``task_acks_late=True``: a message is acknowledged only after its decision is written. A worker that dies
  mid-batch has acknowledged nothing, so Redis redelivers its events.
* ``task_reject_on_worker_lost=True``: without it Celery *acks* a late-ack task whose process died, i.e. loses
  it. (With the threads pool there is no child process to lose, but the setting keeps the guarantee if anyone
  switches pools.)
* ``visibility_timeout`` (``MODERATION_VISIBILITY_TIMEOUT_S``, default 300 s): the Redis transport has no
  real acks; an unacked message becomes visible again this long after delivery. It must exceed the longest a
  message can sit in a worker (prefetch wait + batch + write). Kombu's default is one hour, so a crashed
  worker's events would wait an hour; 300 s bounds that. Tests use a few seconds.
* ``unacked_restore_interval``/``throttle``: how often live workers sweep for expired messages (Kombu's
  default is every ~100 s; we sweep every ``restore_interval_s``).
* ``worker_prefetch_multiplier=1`` with ``concurrency=prefetch`` threads: a worker holds at most ``prefetch``
  unacked messages, each parked on its own thread until its batch is decided. That is what lets crops
  from many events share one model call without a batching library that acks for us (celery-batches
  acks a whole batch, failures included, and never retries).
* ``task_acks_on_failure_or_timeout=True`` (Celery's default, kept): a task that raised is acked; our task
  never raises for an image (errors are decisions), and re-publishes itself (``retry``) when the
  decision store is unreachable, so nothing is acked undecided.
* JSON only (``accept_content=["json"]``): a pickle from the queue would be code execution.
* Queue order ``priority``: the worker polls ``{ns}.urgent`` before ``{ns}.events`` every time.
* No result backend: the decision store is the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery

from worker.errors import ErrorReason
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.process.runtime import Runtime

DECIDE_TASK = "moderation.decide"


@dataclass(frozen=True)
class Queues:
    ns: str

    @property
    def events(self) -> str:
        return f"{self.ns}.events"

    @property
    def urgent(self) -> str:
        return f"{self.ns}.urgent"

    @property
    def training(self) -> str:
        return f"{self.ns}.training"


class ModerationCelery(Celery):
    """A Celery app that carries the worker's runtime (model, batcher, store) for its tasks."""

    runtime: Runtime | None = None
    settings: Settings


def delivery_config(settings: Settings) -> dict[str, Any]:
    q = Queues(settings.namespace)
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": q.events,
        "task_create_missing_queues": True,
        "task_routes": {DECIDE_TASK: {"queue": q.events}},
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "broker_pool_limit": 10,
    }


def make_app(settings: Settings) -> ModerationCelery:
    """Build the Celery program for these settings; no global app, nothing happens at import."""
    if not settings.redis_url:
        raise ValueError("a Redis URL is required (REDIS_URL or MODERATION_REDIS_URL)")
    app = ModerationCelery(f"{settings.namespace}-worker", set_as_current=False)
    app.settings = settings
    app.conf.update(delivery_config(settings))

    @app.task(name=DECIDE_TASK, bind=True, max_retries=settings.redis_retries)
    def decide(self: Any, raw: str) -> None:
        """One event in, one decision (or dead-letter entry) out; the runtime batches across tasks."""
        runtime = self.app.runtime
        if runtime is None:  # a producer-only app never executes tasks
            raise RuntimeError("this app has no worker runtime")
        try:
            runtime.handle(raw, task_id=self.request.id)
        except runtime.retryable as exc:
            if self.request.retries >= self.max_retries:
                runtime.dead_letter(raw, ErrorReason.INTERNAL, f"decision store unreachable: {exc}")
                return
            raise self.retry(exc=exc, countdown=min(30, 2**self.request.retries)) from exc

    return app
