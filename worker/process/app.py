"""The Celery program ``moderation worker`` runs around the stream consumer; its settings explained here.

Events do not travel as Celery messages: the worker reads them from Redis Streams in batches
(worker/ingress/consumer.py), started and stopped by :class:`StreamIngress`, a consumer bootstep. Celery
stays for what it is good at: the training queue (``moderation train-worker``, training/jobs.py), remote
control (``celery inspect``/``control``, Flower), logging and signal handling (first SIGTERM: warm shutdown,
which stops the step; second: exit now).

Settings that matter:

* JSON only (``accept_content=["json"]``): a pickle from a queue would be code execution.
* ``task_acks_late=True``, ``task_reject_on_worker_lost=True``, ``worker_prefetch_multiplier=1``: the training
  queue's jobs are acked only when done, and never acked by a dying process.
* ``broker_transport_options.visibility_timeout``: Celery's own queues (training) redeliver an unacked job
  after this long; the event streams use the same setting for ``XAUTOCLAIM``.
* No result backend: the decision store and the training job records are the results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps

from worker.keys import Queues
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.process.runtime import Runtime

__all__ = ["ModerationCelery", "Queues", "StreamIngress", "delivery_config", "make_app"]


class ModerationCelery(Celery):
    """A Celery app that carries its settings (the training task reads them)."""

    settings: Settings


class StreamIngress(bootsteps.StartStopStep):
    """Consumer bootstep: the stream consumer runs while Celery's consumer runs.

    Celery restarts its consumer blueprint when the broker connection drops (stop, then start): the stream
    consumer has its own connection and keeps going then; it stops reading only when the worker shuts down.
    The runtime comes in through the worker's options (``app.Worker(moderation_runtime=...)``).
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, moderation_runtime: Runtime | None = None, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.runtime = moderation_runtime

    def start(self, parent: Any) -> None:
        if self.runtime is not None:
            self.runtime.start_consuming()

    def stop(self, parent: Any) -> None:
        from celery.worker import state

        if self.runtime is not None and (state.should_stop is not None or state.should_terminate is not None):
            self.runtime.stop_consuming()

    def shutdown(self, parent: Any) -> None:
        if self.runtime is not None:
            self.runtime.stop_consuming()


def delivery_config(settings: Settings) -> dict[str, Any]:
    q = Queues(settings.namespace)
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": q.control,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": settings.celery_events,
        "task_send_sent_event": settings.celery_events,
        "broker_pool_limit": 10,
    }


def make_app(settings: Settings) -> ModerationCelery:
    """Build the Celery program for these settings; no global app, nothing happens at import."""
    settings.require_redis("the Celery program uses Redis as its broker")
    app = ModerationCelery(f"{settings.namespace}-worker", set_as_current=False)
    app.settings = settings
    app.conf.update(delivery_config(settings))
    app.steps["consumer"].add(StreamIngress)
    return app
