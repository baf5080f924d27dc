"""Prometheus metrics of the worker, created on an explicit registry (no import-time global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "moderation_decisions", "Decisions written, by verdict.", ["verdict"], registry=r
        )
        self.errors = Counter("moderation_errors", "Error decisions, by reason.", ["reason"], registry=r)
        self.duplicates = Counter(
            "moderation_duplicate_deliveries",
            "Redelivered events already decided (not written again).",
            registry=r,
        )
        self.dead_letters = Counter(
            "moderation_dead_letters", "Messages dead-lettered, by reason.", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "moderation_batch_crops", "Crops per model call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "moderation_queue_wait_seconds", "Submit to worker pick-up.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "moderation_end_to_end_seconds",
            "Submit to decision written.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_time = Histogram(
            "moderation_model_seconds", "Model time per batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.scores = Histogram(
            "moderation_ai_score", "ai_score of decided images (drift).", buckets=_SCORE_BUCKETS, registry=r
        )
        self.model_info = Info("moderation_model", "Model version being served.", registry=r)
        self.reloads = Counter("moderation_reloads", "Model swaps that succeeded.", registry=r)
        self.reload_failures = Counter(
            "moderation_reload_failures", "Model versions refused, by reason.", ["reason"], registry=r
        )
        self.model_fallbacks = Counter(
            "moderation_model_fallbacks",
            "Starts that served an older version because the current one was refused.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "moderation_queue_depth", "Messages waiting in the broker, by queue.", ["queue"], registry=r
        )
        self.in_flight = Gauge(
            "moderation_in_flight", "Events held by this worker, not yet decided.", registry=r
        )
