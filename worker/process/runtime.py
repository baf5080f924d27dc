"""What a worker process holds while it runs: model source, batcher, decision store, metrics, webhooks.

Built once at the edge (``moderation worker``) before Celery starts consuming, so the model is loaded in the
main process (Celery kills a pool child whose start-up takes more than 4 s; the threads pool has none).
:meth:`Runtime.handle` is the whole per-message contract: every message ends as exactly one decision or one
dead-letter entry, and the caller acks only after that.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

import redis
import structlog

from worker.delivery.reaper import Reaper
from worker.delivery.store import DecisionStore
from worker.delivery.webhook import Webhooks
from worker.errors import ErrorReason, SchemaError
from worker.media.fetch import Fetcher
from worker.ops.metrics import Metrics
from worker.ops.tracking import item_error_breadcrumb
from worker.records import Decision, Event, Verdict, utcnow
from worker.scoring.batcher import Batcher, ScorerSource
from worker.settings import Settings

log = structlog.get_logger(__name__)


def build_source(settings: Settings, metrics: Metrics, client: redis.Redis) -> ScorerSource:
    """The registry's current version, followed live (hot reload, shadow mode); a pinned checkpoint is served
    as is. Raises CheckpointError when there is nothing valid to serve."""
    from worker.lifecycle.reload import ModelWatcher

    return ModelWatcher(settings, metrics, client).start()


class Runtime:
    retryable: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def __init__(
        self,
        settings: Settings,
        source: ScorerSource | None = None,
        metrics: Metrics | None = None,
        hostname: str | None = None,
    ) -> None:
        if not settings.redis_url:
            raise ValueError("a Redis URL is required")
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.redis: Any = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.store = DecisionStore(self.redis, settings.namespace)
        self.source = source or build_source(settings, self.metrics, self.redis)
        self.fetcher = Fetcher(settings)
        self.hostname = hostname or f"{socket.gethostname()}-{os.getpid()}"
        self.batcher = Batcher(self.source, self.fetcher, settings, self.metrics, self.store, self.hostname)
        self.webhooks = Webhooks(settings)
        self.ready = False
        self.reaper: Reaper | None = None
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._in_flight = 0
        self._lock = threading.Lock()

    def start(self) -> Runtime:
        self.batcher.start()
        self._heartbeat.start()
        return self

    # --- per message ---------------------------------------------------------------------------------
    def handle(self, raw: str | bytes, task_id: str | None = None) -> Decision | None:
        """Decide one message. Returns the decision, or None when it was dead-lettered or already decided."""
        picked = utcnow()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(task_id=task_id)
        try:
            event = Event.from_json(raw)
        except SchemaError as exc:
            self.store.dead_letter(ErrorReason.MALFORMED_EVENT.value, str(exc), raw, task_id=task_id or "")
            self.metrics.dead_letters.labels(ErrorReason.MALFORMED_EVENT.value).inc()
            log.warning("dead_lettered", reason="malformed_event", detail=str(exc))
            return None
        structlog.contextvars.bind_contextvars(event_id=event.event_id, item_id=event.item_id)
        deliveries, decided = self.store.count_delivery(event.event_id)
        if decided:
            self.metrics.duplicates.inc()
            log.info("duplicate_delivery", deliveries=deliveries)
            return None
        if deliveries > self.settings.max_deliveries:
            detail = f"delivered {deliveries} times without a decision (worker crashes while deciding it?)"
            self.store.dead_letter(ErrorReason.REDELIVERY_LIMIT.value, detail, raw, event_id=event.event_id)
            self.store.forget_deliveries([event.event_id])
            self.metrics.dead_letters.labels(ErrorReason.REDELIVERY_LIMIT.value).inc()
            log.error("dead_lettered", reason="redelivery_limit", deliveries=deliveries)
            return None
        self.metrics.queue_wait.observe(max(0.0, (picked - event.submitted_at).total_seconds()))
        with self._lock:
            self._in_flight += 1
            self.metrics.in_flight.set(self._in_flight)
        try:
            outcome = self.batcher.submit(event).result()
        finally:
            with self._lock:
                self._in_flight -= 1
                self.metrics.in_flight.set(self._in_flight)
        decision = outcome.decision
        structlog.contextvars.bind_contextvars(model_version=decision.model_version)
        if not outcome.written:
            self.metrics.duplicates.inc()
            log.info("duplicate_delivery", deliveries=deliveries)
            return decision
        self._account(decision, event)
        if event.callback_url:
            self.webhooks.send(event.callback_url, decision)
        return decision

    def _account(self, d: Decision, event: Event) -> None:
        m = self.metrics
        m.decisions.labels(d.verdict.value).inc()
        m.latency.observe(max(0.0, (d.decided_at - event.submitted_at).total_seconds()))
        if d.verdict == Verdict.ERROR:
            reason = d.reason.value if d.reason else "unknown"
            m.errors.labels(reason).inc()
            item_error_breadcrumb(d)  # a bad image is context for Sentry, never an alert of its own
            log.info("decided", verdict=d.verdict.value, reason=reason, detail=d.detail)
        else:
            if d.ai_score is not None:
                m.scores.observe(d.ai_score)
            log.info("decided", verdict=d.verdict.value, ai_score=round(d.ai_score or 0.0, 5))

    def dead_letter(self, raw: str | bytes, reason: ErrorReason, detail: str) -> None:
        self.store.dead_letter(reason.value, detail, raw)
        self.metrics.dead_letters.labels(reason.value).inc()

    # --- liveness ------------------------------------------------------------------------------------
    def _beat(self) -> None:
        from worker.process.app import Queues

        q = Queues(self.settings.namespace)
        key = self.store.keys.worker(self.hostname)
        ttl = max(3, int(self.settings.heartbeat_s * 3))
        while not self._stop.is_set():
            try:
                scorer = self.source.current()
                pipe = self.redis.pipeline(transaction=False)
                pipe.hset(
                    key,
                    mapping={
                        "hostname": self.hostname,
                        "pid": os.getpid(),
                        "model_version": scorer.version,
                        "ready": int(self.ready),
                        "batches": self.batcher.batches,
                        "at": time.time(),
                    },
                )
                pipe.expire(key, ttl)
                pipe.llen(q.events)
                pipe.llen(q.urgent)
                _, _, events, urgent = pipe.execute()
                self.metrics.queue_depth.labels(q.events).set(events)
                self.metrics.queue_depth.labels(q.urgent).set(urgent)
            except Exception:
                log.warning("heartbeat_failed", exc_info=True)
            try:
                self._reaper().maybe_sweep()
            except Exception:
                log.warning("reaper_failed", exc_info=True)
            self._stop.wait(self.settings.heartbeat_s)

    def _reaper(self) -> Reaper:
        if self.reaper is None:
            from worker.ingress.producer import Producer

            producer = Producer(self.settings)
            self.reaper = Reaper(
                self.settings, self.store, lambda raw, urgent: producer.send_raw(raw, urgent, register=False)
            )
        return self.reaper

    def mark_ready(self) -> None:
        self.ready = True
        self.redis.hset(self.store.keys.worker(self.hostname), "ready", 1)

    def close(self) -> None:
        """Drain: every submitted event is decided and written before this returns."""
        self.batcher.close()
        self.webhooks.close()
        self._stop.set()
        self._heartbeat.join(5)
        if hasattr(self.source, "close"):  # stop the model watcher's threads (worker.lifecycle.reload)
            self.source.close()
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(self.store.keys.worker(self.hostname))
        self.fetcher.close()


def live_workers(client: Any, namespace: str) -> list[dict[str, str]]:
    """Heartbeats of workers seen in the last few seconds."""
    return [dict(client.hgetall(k)) for k in client.scan_iter(f"{namespace}:worker:*")]
