"""One worker process, wired in one place: what it holds, in which order it starts and stops.

Built once at the edge (``moderation worker``) before Celery starts, so the model is loaded in the main
process. Start: Redis clients, decision store, model source (hot reload), fetcher, batcher, webhooks, stream
consumer, heartbeat. The Celery consumer bootstep (worker/process/app.py) calls :meth:`start_consuming` and
:meth:`stop_consuming`; :meth:`close` drains and stops everything in reverse order. Every entry the consumer
reads ends as exactly one decision or one dead-letter entry, and is acked in the same script as that write.
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

from worker.delivery.store import Ack, DecisionStore
from worker.delivery.webhook import Webhooks
from worker.ingress.consumer import StreamConsumer
from worker.keys import Keys
from worker.media.fetch import Fetcher
from worker.media.provenance import EvidenceMetrics
from worker.ops.metrics import Metrics
from worker.ops.tracking import item_error_breadcrumb
from worker.records import Decision, Verdict
from worker.scoring.batcher import Batcher, Decided, Job, ScorerSource
from worker.scoring.duplicates import DuplicateIndex
from worker.settings import Settings

log = structlog.get_logger(__name__)


def build_source(settings: Settings, metrics: Metrics, client: redis.Redis) -> ScorerSource:
    """The registry's current version, followed live (hot reload, shadow mode); a pinned checkpoint is served
    as is. Raises CheckpointError when there is nothing valid to serve."""
    from worker.lifecycle.reload import ModelWatcher

    return ModelWatcher(settings, metrics, client).start()


def require_redis(settings: Settings) -> str:
    return settings.require_redis("a worker reads events from Redis")


class Runtime:
    def __init__(
        self,
        settings: Settings,
        source: ScorerSource | None = None,
        metrics: Metrics | None = None,
        hostname: str | None = None,
    ) -> None:
        url = require_redis(settings)
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.keys = Keys(settings.namespace)
        self.redis: Any = redis.Redis.from_url(url, decode_responses=True)
        self.store = DecisionStore(
            self.redis,
            settings.namespace,
            ttl_s=settings.record_ttl_s,
            decisions_maxlen=settings.decisions_maxlen,
        )
        self.source = source or build_source(settings, self.metrics, self.redis)
        self.fetcher = Fetcher(settings)
        self.hostname = hostname or f"{socket.gethostname()}-{os.getpid()}"
        self.batcher = Batcher(
            self.source,
            self.fetcher,
            settings,
            self.metrics,
            self.store,
            self.hostname,
            on_decided=self._decided,
            on_failed=self._failed,
            duplicates=DuplicateIndex.from_url(url, settings) if settings.duplicates else None,
            evidence=EvidenceMetrics(self.metrics.registry),
        )
        self.webhooks = Webhooks(settings, registry=self.metrics.registry)
        self.consumer = StreamConsumer(
            settings,
            redis.Redis.from_url(url, decode_responses=False),
            self.store,
            self.batcher,
            self.metrics,
            self.hostname,
        )
        self.ready = False
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._closed = False

    def start(self) -> Runtime:
        self.batcher.start()
        self._heartbeat.start()
        return self

    def start_consuming(self) -> None:
        self.consumer.start()

    def stop_consuming(self) -> None:
        """First stop signal: read nothing more; held entries are still decided and acked by :meth:`close`."""
        self.consumer.stop_reading()

    # --- after each batch (model thread) -------------------------------------------------------------
    def _decided(self, done: list[Decided]) -> None:
        try:
            for d in done:
                if d.written:
                    self._account(d.decision, d.job)
                    if d.job.event.callback_url:
                        self.webhooks.send(d.job.event.callback_url, d.decision)
                else:
                    self.metrics.duplicates.inc()
                    log.info("duplicate_delivery", event_id=d.decision.event_id, entry_id=_entry(d.job.ack))
        finally:
            self.consumer.settled([d.job.ack for d in done])

    def _failed(self, jobs: list[Job], exc: BaseException) -> None:
        log.error(
            "batch_not_written",
            size=len(jobs),
            error=str(exc),
            then="redelivered after the visibility timeout",
        )
        self.consumer.settled([j.ack for j in jobs])

    def _account(self, d: Decision, job: Job) -> None:
        m = self.metrics
        m.decisions.labels(d.verdict.value).inc()
        m.latency.observe(max(0.0, (d.decided_at - job.event.submitted_at).total_seconds()))
        fields = {
            "event_id": d.event_id,
            "item_id": d.item_id,
            "model_version": d.model_version,
            "entry_id": _entry(job.ack),
            "verdict": d.verdict.value,
        }
        if d.verdict == Verdict.ERROR:
            reason = d.reason.value if d.reason else "unknown"
            m.errors.labels(reason).inc()
            item_error_breadcrumb(d)  # a bad image is context for Sentry, never an alert of its own
            log.info("decided", reason=reason, detail=d.detail, **fields)
        else:
            if d.ai_score is not None:
                m.scores.observe(d.ai_score)
            log.info("decided", ai_score=round(d.ai_score or 0.0, 5), **fields)

    # --- liveness ------------------------------------------------------------------------------------
    def _beat(self) -> None:
        key = self.keys.worker(self.hostname)
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
                        "held": self.consumer.held,
                        "at": time.time(),
                    },
                )
                pipe.expire(key, ttl)
                for stream in self.keys.streams:
                    pipe.xlen(stream)  # unread + held: acked entries are deleted
                depths = pipe.execute()[2:]
                for stream, depth in zip(self.keys.streams, depths, strict=True):
                    self.metrics.queue_depth.labels(stream).set(depth)
            except Exception:
                log.warning("heartbeat_failed", exc_info=True)
            self._stop.wait(self.settings.heartbeat_s)

    def mark_ready(self) -> None:
        self.ready = True
        self.redis.hset(self.keys.worker(self.hostname), "ready", 1)

    def close(self) -> None:
        """Drain: every held entry is decided, written and acked before this returns."""
        if self._closed:
            return
        self._closed = True
        if not self.consumer.drain(timeout=float(self.settings.visibility_timeout_s)):
            log.error(
                "drain_incomplete", held=self.consumer.held, then="redelivered after the visibility timeout"
            )
        self.batcher.close()
        self.webhooks.close()
        self._stop.set()
        self._heartbeat.join(5)
        if hasattr(self.source, "close"):  # stop the model watcher's threads (worker.lifecycle.reload)
            self.source.close()
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(self.keys.worker(self.hostname))
        self.fetcher.close()


def live_workers(client: Any, namespace: str) -> list[dict[str, str]]:
    """Heartbeats of workers seen in the last few seconds."""
    return [dict(client.hgetall(k)) for k in client.scan_iter(Keys(namespace).workers_pattern)]


def _entry(ack: Ack | None) -> str | None:
    return ack[1] if ack else None
