"""Hot reload: follow the registry's ``current`` pointer and swap models between two batches.

:class:`ModelWatcher` is the batcher's ``ScorerSource``. The batcher calls :meth:`ModelWatcher.current` once
per batch and gets whatever model is being served at that instant; a background thread does everything slow
(download, checksum, golden-image check, output-shape check, warm-up) and then replaces that reference in one
assignment under a lock. A batch already running keeps the model it started with, so no event ever sees half
a swap and nothing has to be drained or restarted.

Why a thread and not a second process: the new model must end up in this process's memory (and on its GPU),
and the swap must be a pointer flip; a thread is the cheapest way to prepare it off the hot path.

The registry pointer is the truth. A Redis PUBLISH on ``{ns}:model`` (sent by ``moderation promote`` and
``rollback``) only wakes the watcher early; if it is lost, the next poll finds the new pointer anyway.

A version that fails validation is never served. It is remembered (by version, which is immutable) so the
watcher does not reload it in a loop, and reported three ways: a structlog line, the
``moderation_reload_failures{reason}`` counter, and a Sentry message.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from worker.errors import CheckpointError, InvalidCheckpoint
from worker.keys import Keys
from worker.lifecycle import shadow
from worker.ops.metrics import Metrics
from worker.records import utcnow

if TYPE_CHECKING:
    from worker.errors import ModerationError
    from worker.lifecycle.registry import Registry
    from worker.records import Decision, Event
    from worker.scoring.scorer import Prepared, Scorer
    from worker.settings import Settings

log = structlog.get_logger("worker.lifecycle.reload")


def notify(client: Any, ns: str, action: str, version: str | None, by: str) -> bool:
    """Best-effort PUBLISH so watchers reload now rather than at their next poll."""
    message = json.dumps({"action": action, "version": version, "by": by, "at": utcnow().isoformat()})
    try:
        client.publish(Keys(ns).model_channel, message)
        return True
    except Exception as exc:  # the pointer is already flipped; polling will find it
        log.warning("reload_notify_failed", action=action, version=version, error=str(exc))
        return False


TRANSIENT = frozenset({"unreadable", "out_of_memory"})  # may pass later: retried, not remembered for good
RETRY_TRANSIENT_S = 30.0
LOW_PRIORITY = 10  # niceness of the loading and shadow threads


def _s3_errors() -> tuple[type[Exception], ...]:
    """botocore's base error, which an s3:// registry raises; none where boto3 is not installed (then no s3://
    checkpoint can be read either), so a worker serving local checkpoints does not need botocore."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return ()
    return (BotoCoreError,)


class Refused(Exception):
    """A candidate model failed one validation step; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT


class ModelWatcher:
    """The model being served, kept up to date with the registry (implements ``ScorerSource``)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        redis_client: Any = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.redis = redis_client
        self.keys = Keys(settings.namespace)
        self.pinned = settings.checkpoint
        self._registry = registry
        self._lock = threading.Lock()  # guards the two references below
        self._scorer: Scorer | None = None
        self._shadow: Scorer | None = None
        self._check_lock = threading.Lock()  # one load at a time, whoever triggers it
        self._refused: dict[str, str] = {}  # immutable versions that failed for good
        self._failed_at: dict[str, float] = {}  # versions that failed for now (store unreachable, GPU full)
        self.retry_transient_s = RETRY_TRANSIENT_S
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._skipped_full: dict[str, int] = {}
        self._shadow_jobs: queue.Queue[tuple[Scorer, Sequence[Any], Sequence[Decision], float]] = queue.Queue(
            maxsize=settings.shadow_queue
        )
        self.worker_name = f"{socket.gethostname()}-{os.getpid()}"  # the runtime's default worker name

    # --- the ScorerSource protocol ----------------------------------------------------------------------

    def current(self) -> Scorer:
        """The model for the next batch; never blocks on a load in progress."""
        with self._lock:
            scorer = self._scorer
        if scorer is None:
            raise RuntimeError("ModelWatcher.start() has not loaded a model yet")
        return scorer

    def observe(
        self,
        prepared_items: Sequence[tuple[Event, Prepared | ModerationError]],
        decisions: Sequence[Decision],
        model_seconds: float,
    ) -> None:
        """After each live batch: hand it to the shadow model, if any, without delaying the batcher."""
        with self._lock:
            candidate = self._shadow
        if candidate is None or self.redis is None:
            return
        try:
            self._shadow_jobs.put_nowait((candidate, prepared_items, decisions, model_seconds))
        except queue.Full:  # the shadow is slower than live traffic: sample, never back-pressure
            with self._lock:  # counted in memory: no Redis round trip on the model thread
                self._skipped_full[candidate.version] = self._skipped_full.get(candidate.version, 0) + 1

    # --- lifecycle ----------------------------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        with self._lock:
            return None if self._scorer is None else self._scorer.version

    @property
    def shadow_version(self) -> str | None:
        with self._lock:
            return None if self._shadow is None else self._shadow.version

    @property
    def refused(self) -> dict[str, str]:
        """Versions this process refused, with why."""
        return dict(self._refused)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from worker.lifecycle.registry import open_registry

            self._registry = open_registry(self.settings)
        return self._registry

    def start(self, *, background: bool = True) -> ModelWatcher:
        """Load the first model (blocking: a worker cannot serve without one), then start watching."""
        self._scorer = self._initial()
        self._publish_info(self._scorer, previous=None)
        log.info("model_serving", model_version=self._scorer.version, pinned=bool(self.pinned))
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self._check_shadow()
        if background:
            self._spawn("model-watch", self._watch_loop, nice=LOW_PRIORITY)
            if self.redis is not None:
                self._spawn("model-listen", self._listen_loop)
                self._spawn("model-shadow", self._shadow_loop, nice=LOW_PRIORITY)
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()

    def __enter__(self) -> ModelWatcher:
        return self.start() if self._scorer is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_now(self) -> str | None:
        """One watch step: follow ``current`` and the shadow setting. Returns the version now served."""
        with self._check_lock:
            if not self.pinned:
                self._check_current()
            if self.redis is not None:
                self._check_shadow()
        return self.version

    def flush_shadow(self, timeout: float = 30.0) -> None:
        """Wait until queued shadow batches are recorded (tests, graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while self._shadow_jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    # --- loading and validation ---------------------------------------------------------------------------

    def _initial(self) -> Scorer:
        if self.pinned:
            try:
                return self._load(self.pinned, expect=None)
            except Refused as exc:
                self._refuse(self.pinned, exc)
                raise CheckpointError(f"pinned checkpoint {self.pinned} refused: {exc}") from exc
        pointer = self.registry.pointer()
        if pointer is None:
            raise CheckpointError(
                f"the registry at {self.registry.root} has no current version; "
                "publish one with `moderation publish DIR --promote` or pin MODERATION_CHECKPOINT"
            )
        # Newest first: if ``current`` is broken, serve the last good version rather than nothing.
        candidates = [pointer.version] + [e.version for e in reversed(pointer.history)]
        refused: dict[str, str] = {}
        for version in dict.fromkeys(candidates):
            try:
                scorer = self._load(self.registry.uri_for(version), expect=version)
            except Refused as exc:
                self._refuse(version, exc)
                refused[version] = exc.reason
                continue
            if version != pointer.version:
                self.metrics.model_fallbacks.inc()
                log.error(
                    "model_fallback",
                    model_version=version,
                    current_version=pointer.version,
                    refused=refused,
                    message=f"current version {pointer.version} was refused; serving the last good version "
                    f"{version} until a version that validates is promoted",
                )
            return scorer
        raise CheckpointError(
            f"no version in the registry at {self.registry.root} passes validation (refused: {refused})"
        )

    def _check_current(self) -> None:
        try:
            version = self.registry.current_version()
        except Exception as exc:  # registry unreachable: keep serving, try again next poll
            log.warning("reload_registry_unreadable", registry=self.registry.root, error=str(exc))
            return
        if version is None or version == self.version or self._skip(version):
            return
        log.info("reload_started", model_version=version, previous=self.version)
        t0 = time.perf_counter()
        with self._lock:
            shadowed = self._shadow if self._shadow is not None and self._shadow.version == version else None
        if shadowed is not None:
            scorer = shadowed  # promoting the shadowed version: it is loaded and validated already
        else:
            try:
                scorer = self._load(self.registry.uri_for(version), expect=version)
            except Refused as exc:
                self._refuse(version, exc)
                return
        with self._lock:
            if shadowed is not None:
                self._shadow = None
            previous, self._scorer = self._scorer, scorer  # the swap: batches after this line use ``scorer``
        self.metrics.reloads.inc()
        self._publish_info(scorer, previous=previous.version if previous else None)
        log.info(
            "reloaded",
            model_version=scorer.version,
            previous=previous.version if previous else None,
            load_s=round(time.perf_counter() - t0, 3),
        )

    def _check_shadow(self) -> None:
        raw = self.redis.get(self.keys.shadow)
        wanted = raw.decode() if isinstance(raw, bytes) else raw
        if wanted == self.shadow_version:
            return
        if wanted is None or wanted == self.version or self._skip(wanted):  # promoted: nothing to shadow
            if self.shadow_version is not None:
                with self._lock:
                    self._shadow = None
                log.info("shadow_off")
            return
        try:
            candidate = self._load(self.registry.uri_for(wanted), expect=wanted)
        except Refused as exc:
            self._refuse(wanted, exc)
            return
        with self._lock:
            self._shadow = candidate
        log.info("shadow_on", shadow_version=wanted, model_version=self.version)

    def _load(self, uri: str, expect: str | None) -> Scorer:
        """Download, verify, build, check golden scores and output shape, warm up; else :class:`Refused`."""
        import numpy as np
        import torch

        from worker.scoring.checkpoint import check_golden, fetch_checkpoint, load_checkpoint, read_manifest
        from worker.scoring.model import to_input
        from worker.scoring.scorer import Scorer

        s = self.settings
        device = s.resolved_device()
        unreadable: tuple[type[Exception], ...] = (CheckpointError, OSError, *_s3_errors())
        try:
            path = fetch_checkpoint(uri, s)
            manifest = read_manifest(path)
        except InvalidCheckpoint as exc:  # e.g. a traversal weights name, crop size out of range
            raise Refused("manifest", str(exc)) from exc
        except unreadable as exc:
            raise Refused("unreadable", str(exc)) from exc
        except Exception as exc:  # anything else a hostile manifest provokes is still a refusal, not a crash
            raise Refused("manifest", f"{type(exc).__name__}: {exc}") from exc
        if expect is not None and manifest.version != expect:
            raise Refused("version_mismatch", f"manifest at {uri} says {manifest.version}, expected {expect}")
        try:
            ckpt = load_checkpoint(path, s, device=device)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            raise Refused("out_of_memory", str(exc)) from exc
        except InvalidCheckpoint as exc:
            raise Refused("weights", str(exc)) from exc
        except CheckpointError as exc:
            reason = "checksum" if "sha256" in str(exc) else "weights"
            raise Refused(reason, str(exc)) from exc
        except OSError as exc:
            raise Refused("unreadable", str(exc)) from exc
        except Exception as exc:
            raise Refused("weights", f"{type(exc).__name__}: {exc}") from exc
        try:
            check_golden(ckpt, device, s.golden_tolerance)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            raise Refused("out_of_memory", str(exc)) from exc
        except InvalidCheckpoint as exc:
            raise Refused("non_finite" if "non-finite" in str(exc) else "golden", str(exc)) from exc
        except CheckpointError as exc:
            raise Refused("golden", str(exc)) from exc
        except Exception as exc:
            raise Refused("inference", f"{type(exc).__name__}: {exc}") from exc
        n = s.reload_warmup_batch
        dummy = np.zeros((n, manifest.crop_size, manifest.crop_size, 3), dtype=np.uint8)
        try:
            with torch.inference_mode():
                out = ckpt.model(to_input(dummy, manifest.mean, manifest.std, device))
            if tuple(out.shape) != (n, 1):
                raise Refused("output_shape", f"model output {tuple(out.shape)} on {n} crops, want ({n}, 1)")
            scorer = Scorer(ckpt, s)
            warm = scorer.logits(
                dummy
            )  # warm-up through the exact serving path (compile, autocast, allocator)
            if not (bool(torch.isfinite(out).all()) and bool(np.isfinite(warm).all())):
                raise Refused("non_finite", f"model gave non-finite outputs on warm-up crops: {warm[:4]}")
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            raise Refused("out_of_memory", str(exc)) from exc
        except Refused:
            raise
        except Exception as exc:
            raise Refused("inference", f"{type(exc).__name__}: {exc}") from exc
        return scorer

    def _refuse(self, version: str, exc: Refused) -> None:
        import sentry_sdk

        if exc.transient:
            self._failed_at[version] = time.monotonic()
        else:
            self._refused[version] = f"{exc.reason}: {exc.detail}"
        self.metrics.reload_failures.labels(reason=exc.reason).inc()
        log.error(
            "reload_refused",
            refused_version=version,
            reason=exc.reason,
            detail=exc.detail,
            model_version=self.version,
        )
        sentry_sdk.capture_message(f"model {version} refused ({exc.reason}): {exc.detail}", level="error")
        if self.redis is not None:
            record = {"reason": exc.reason, "detail": exc.detail[:500], "worker": self.worker_name}
            with contextlib.suppress(Exception):
                self.redis.hset(
                    self.keys.model_refused, version, json.dumps({**record, "at": utcnow().isoformat()})
                )

    def _skip(self, version: str) -> bool:
        """Refused for good, or failed transiently less than ``retry_transient_s`` ago."""
        failed = self._failed_at.get(version)
        recent = failed is not None and time.monotonic() < failed + self.retry_transient_s
        return version in self._refused or recent

    def _publish_info(self, scorer: Scorer, previous: str | None) -> None:
        m = scorer.manifest
        self.metrics.set_model(
            version=m.version,
            arch=m.arch,
            crop_size=m.crop_size,
            source="pinned" if self.pinned else "registry",
        )

    # --- background threads -------------------------------------------------------------------------------

    def _spawn(self, name: str, target: Any, nice: int = 0) -> None:
        def run() -> None:
            if nice and hasattr(os, "setpriority"):
                # Linux niceness is per thread (and inherited by the OpenMP threads torch starts from it):
                # loading and shadow scoring yield the CPU to the live model thread.
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            target()

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.reload_poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_now()
            except Exception as exc:  # never let the watcher die: the old model keeps serving
                log.exception("reload_check_failed", error=str(exc))

    def _listen_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.model_channel)
                backoff = 0.5
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._wake.set()
            except Exception as exc:  # Redis restarting: polling covers the gap
                log.warning("reload_channel_lost", error=str(exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()

    def _shadow_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._shadow_jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._flush_skipped()
                self._score_shadow(*job)
            except Exception as exc:
                log.warning("shadow_scoring_failed", error=str(exc))
            finally:
                self._shadow_jobs.task_done()

    def _flush_skipped(self) -> None:
        with self._lock:
            skipped, self._skipped_full = self._skipped_full, {}
        for version, n in skipped.items():
            shadow.count_skipped(self.redis, self.keys.shadow_stats(version), "queue_full", n)

    def _score_shadow(
        self,
        candidate: Scorer,
        items: Sequence[tuple[Event, Prepared | ModerationError]],
        decisions: Sequence[Decision],
        model_seconds: float,
    ) -> None:
        key = self.keys.shadow_stats(candidate.version)
        live = self.version
        if live is not None and live == candidate.version:
            return  # promoted meanwhile: comparing a model with itself says nothing
        from worker.scoring.scorer import Prepared

        cut = next((p.crops.shape[1] for _, p in items if isinstance(p, Prepared)), None)
        if cut is not None and cut != candidate.spec.size:  # crops of this batch were cut for another window
            shadow.count_skipped(self.redis, key, "crop_size_differs")
            return
        shadow_decisions = candidate.score_prepared(list(items))
        shadow_ms = next((d.timings_ms["model"] for d in shadow_decisions if "model" in d.timings_ms), 0.0)
        by_event = {d.event_id: d for d in decisions}
        pairs = [
            shadow.Comparison(live=by_event[d.event_id], shadow=d)
            for d in shadow_decisions
            if d.event_id in by_event
        ]
        shadow.record(self.redis, key, pairs, live_ms=model_seconds * 1e3, shadow_ms=shadow_ms)
