"""Prometheus metrics of the worker, created on an explicit registry (no import-time global state).

Names follow the Prometheus conventions: a ``moderation_`` prefix, base units in the name (``_seconds``,
``_bytes``), counters exported with ``_total``, no per-event or per-reload label values (each label value is a
series kept forever). The registry also carries the client's default process, platform and GC collectors
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ``process_open_fds``,
``process_start_time_seconds``, ``python_info``), so leaks and restarts show. ``*_created`` series are off:
they double the series count and no query here reads them.

One :class:`Metrics` per process; each process exports the families it feeds (a worker does not set the review
backlog unless it samples it, a training worker sets only the training families); unfed families read 0 or
stay empty, which the alerts tolerate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Fetch and decode of one image: milliseconds for a small local file, seconds for a slow origin or a huge PNG.
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every family the moderation processes export, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process_collectors: bool = True) -> None:
        disable_created_metrics()  # a process-wide switch of the client; idempotent
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # --- decisions ------------------------------------------------------------------------------
        self.decisions = Counter(
            "moderation_decisions", "Decisions written, by verdict.", ["verdict"], registry=r
        )
        self.errors = Counter(
            "moderation_errors",
            "Error decisions written, by machine-readable reason.",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "moderation_duplicate_deliveries",
            "Redelivered events already decided (not written again).",
            registry=r,
        )
        self.dead_letters = Counter(
            "moderation_dead_letters", "Messages dead-lettered, by reason.", ["reason"], registry=r
        )
        self.scores = Histogram(
            "moderation_ai_score", "ai_score of decided images (drift).", buckets=_SCORE_BUCKETS, registry=r
        )

        # --- latency, stage by stage ----------------------------------------------------------------
        self.queue_wait = Histogram(
            "moderation_queue_wait_seconds",
            "Time from submit to worker pick-up.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fetch_time = Histogram(
            "moderation_fetch_seconds",
            "Time to fetch one image's bytes (file, S3 or HTTPS), retries included.",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            "moderation_decode_seconds",
            "Time to decode one image and cut its crops (Pillow or the device decoder's batch share).",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "moderation_batch_crops", "Crops per model call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.model_time = Histogram(
            "moderation_model_seconds", "Model time per batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "moderation_end_to_end_seconds",
            "Time from submit to decision written.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_fallbacks = Counter(
            "moderation_model_fallbacks",
            "Starts that served an older version because the current one was refused.",
            registry=r,
        )

        # --- queue ----------------------------------------------------------------------------------
        self.queue_depth = Gauge(
            "moderation_queue_depth", "Messages waiting in the broker, by queue.", ["queue"], registry=r
        )
        self.in_flight = Gauge(
            "moderation_in_flight", "Events held by this worker, not yet decided.", registry=r
        )

        # --- model lifecycle ------------------------------------------------------------------------
        # Labels: version, arch, crop_size, source. No "previous": one series per served version, not one
        # per reload. The history of swaps is moderation_reloads_total and the registry's own log.
        self.model_info = Info("moderation_model", "Model version being served.", registry=r)
        self.reloads = Counter("moderation_reloads", "Model swaps that succeeded.", registry=r)
        self.reload_failures = Counter(
            "moderation_reload_failures", "Model versions refused, by reason.", ["reason"], registry=r
        )

    # --- helpers the pipeline calls ---------------------------------------------------------------------
    def observe_timings(self, timings: Iterable[Mapping[str, float]]) -> None:
        """Stage histograms from decisions' ``timings_ms`` (keys ``fetch`` and ``decode_crop``)."""
        for t in timings:
            if "fetch" in t:
                self.fetch_time.observe(t["fetch"] / 1e3)
            if "decode_crop" in t:
                self.decode_time.observe(t["decode_crop"] / 1e3)

    def set_model(self, *, version: str, arch: str, crop_size: int, source: str, **_: Any) -> None:
        """Publish the served model; extra keys (a caller's ``previous``) are dropped on purpose."""
        self.model_info.info(
            {"version": version, "arch": arch, "crop_size": str(crop_size), "source": source}
        )
