"""Cross-event micro-batching: crops from many events share one model call.

Jobs (an event and the stream entry it settles) arrive in groups from the stream consumer. Each is fetched,
decoded and cropped on a small decode pool (so the next batch is prepared while the model runs; on CUDA a JPEG
is only planned there and decoded with its batch on the device, see worker/media/jpeg.py), then queued for
the single model thread, which takes items until it holds ``max_batch`` crops or the oldest has waited
``max_wait_ms``. The model thread asks its :class:`ScorerSource` for the model once per batch: that call is
the hot-reload seam, so a swap always falls between two batches. One rule covers a swap: an item prepared
for another crop window goes back to the decode pool and joins a later batch (the model thread never
fetches). A batch's decisions, and the acks of their entries, are one Redis script call; then
``on_decided`` gets them (metrics, logs, webhooks).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import redis
import structlog

from worker.delivery.store import Ack, DecisionStore
from worker.errors import ErrorReason, ModerationError
from worker.media.crops import CropSpec
from worker.media.fetch import Fetcher
from worker.media.jpeg import Pending
from worker.media.provenance import EvidenceMetrics
from worker.ops.metrics import Metrics
from worker.records import Decision, Event
from worker.scoring.duplicates import DuplicateIndex
from worker.scoring.scorer import Prepared, Scorer, error_decision, prepare_or_error
from worker.settings import Settings

log = structlog.get_logger(__name__)


class ScorerSource(Protocol):
    """Where the batcher gets its model; a reloading implementation swaps what ``current`` returns."""

    def current(self) -> Scorer: ...

    def observe(
        self,
        items: Sequence[tuple[Event, Prepared | ModerationError]],
        decisions: Sequence[Decision],
        model_s: float,
    ) -> None:
        """Called after each batch (shadow scoring hooks in here)."""


@dataclass(frozen=True)
class Job:
    """One event to decide and the stream entry its decision write acknowledges (None: nothing to ack)."""

    event: Event
    ack: Ack | None = None


@dataclass(frozen=True)
class Decided:
    job: Job
    decision: Decision
    written: bool  # False: the event was already decided (a redelivery); nothing new was written


@dataclass
class _Item:
    job: Job
    spec: CropSpec | None  # the crop window it was prepared for (None: an error, any model decides it)
    prepared: Prepared | Pending | ModerationError
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def n_crops(self) -> int:
        p = self.prepared
        if isinstance(p, Prepared):
            return len(p.crops)
        return len(p.boxes) if isinstance(p, Pending) else 0


def _ignore(_: object, __: object = None) -> None:
    return None


class Batcher:
    def __init__(
        self,
        source: ScorerSource,
        fetcher: Fetcher,
        settings: Settings,
        metrics: Metrics,
        store: DecisionStore,
        name: str = "batcher",
        on_decided: Callable[[list[Decided]], None] = _ignore,
        on_failed: Callable[[list[Job], BaseException], None] = _ignore,
        duplicates: DuplicateIndex | None = None,
        evidence: EvidenceMetrics | None = None,
    ) -> None:
        self.name = name
        self.duplicates = duplicates  # near-duplicates of decided items are decided without the model
        self.evidence = evidence
        self.source = source
        self.fetcher = fetcher
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.on_decided = on_decided
        self.on_failed = on_failed
        self._ready: queue.Queue[_Item] = queue.Queue()
        self._decode = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="decode")
        self._preparing = 0  # jobs on the decode pool (drain waits for them)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.batches = 0

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def submit(self, jobs: Sequence[Job]) -> None:
        """Hand jobs to the decode pool; each ends in ``on_decided`` or ``on_failed``, never in silence."""
        with self._lock:
            self._preparing += len(jobs)
        for job in jobs:
            self._decode.submit(self._prepare, job)

    def _prepare(self, job: Job) -> None:
        spec: CropSpec | None = None
        try:
            scorer = self.source.current()
            spec = scorer.spec
            prepared = prepare_or_error(
                job.event.image_uri, self.fetcher, spec, defer_jpeg=scorer.defers_jpeg
            )
        except Exception as exc:  # never strand a job
            prepared = ModerationError(ErrorReason.INTERNAL, f"{type(exc).__name__}: {exc}")
        if isinstance(prepared, ModerationError):
            spec = None
        self._ready.put(_Item(job, spec, prepared))
        with self._lock:
            self._preparing -= 1

    # --- the model thread ----------------------------------------------------------------------------
    def _collect(self) -> list[_Item]:
        try:
            first = self._ready.get(timeout=0.05)
        except queue.Empty:
            return []
        items = [first]
        crops = first.n_crops
        deadline = first.enqueued + self.settings.max_wait_ms / 1e3
        while crops < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._ready.get(timeout=remaining) if remaining > 0 else self._ready.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            crops += item.n_crops
        return items

    def _idle(self) -> bool:
        with self._lock:
            return self._preparing == 0 and self._ready.empty()

    def _run(self) -> None:
        while not self._abort.is_set() and not (self._stop.is_set() and self._idle()):
            items = self._collect()
            if items:
                try:
                    self._process(items)
                except Exception as exc:  # a bug here must not strand the batch's entries
                    log.exception("batch_failed")
                    self.on_failed([it.job for it in items], exc)

    def _process(self, items: list[_Item]) -> None:
        scorer = self.source.current()
        batch: list[_Item] = []
        for it in items:
            if it.spec is not None and it.spec != scorer.spec:  # the model was swapped since: recut
                with self._lock:
                    self._preparing += 1
                self._decode.submit(self._prepare, it.job)
            else:
                batch.append(it)
        if not batch:
            return
        planned = [(it.job.event, it.prepared) for it in batch]
        try:  # the batch's device JPEG decode (one call); score_prepared then finds nothing left to decode
            pairs = scorer.materialize(planned)
        except Exception as exc:  # never strand a job, even on a bug in there
            log.exception("materialize_failed", size=len(planned))
            err = ModerationError(ErrorReason.INTERNAL, f"device decode failed: {type(exc).__name__}: {exc}")
            pairs = [(e, err if isinstance(p, Pending) else p) for e, p in planned]
        t0 = time.perf_counter()
        batch_id = f"{self.name}:{self.batches}"
        decisions = [d.model_copy(update={"batch_id": batch_id}) for d in self._score(scorer, pairs)]
        model_s = time.perf_counter() - t0
        jobs = [it.job for it in batch]
        written = self._write(decisions, jobs)
        if written is None:
            return
        self.batches += 1
        n_crops = sum(it.n_crops for it in batch)
        if n_crops:
            self.metrics.batch_size.observe(n_crops)
            self.metrics.model_time.observe(model_s)
        self.metrics.observe_timings(d.timings_ms for d in decisions)
        self._remember(decisions, written)
        self.on_decided([Decided(j, d, w) for j, d, w in zip(jobs, decisions, written, strict=True)])
        try:
            self.source.observe(pairs, decisions, model_s)
        except Exception:
            log.exception("observe_failed")

    def _remember(self, decisions: list[Decision], written: list[bool]) -> None:
        """Evidence counters and the duplicate index learn from what was written (never fails the batch)."""
        new = [d for d, w in zip(decisions, written, strict=True) if w]
        try:
            if self.evidence is not None:
                self.evidence.observe(new)
            if self.duplicates is not None:
                self.duplicates.remember_decisions(new)
        except Exception:
            log.exception("remember_failed", size=len(new))

    def _write(self, decisions: list[Decision], jobs: list[Job]) -> list[bool] | None:
        """Decisions and acks in one script call, retried while Redis is away (a restart, a failover)."""
        attempts = max(1, self.settings.redis_retries + 1)
        for attempt in range(attempts):
            try:
                return self.store.write_many(decisions, [j.ack for j in jobs])
            except redis.RedisError as exc:
                if attempt + 1 >= attempts or self._abort.is_set():
                    log.error("decision_write_failed", size=len(jobs), error=str(exc), attempts=attempt + 1)
                    self.on_failed(jobs, exc)  # unacked: redelivered after the visibility timeout
                    return None
                log.warning("decision_write_retry", size=len(jobs), error=str(exc), attempt=attempt + 1)
                self._abort.wait(min(5.0, 0.2 * 2**attempt))
        return None

    def _score(self, scorer: Scorer, pairs: list[tuple[Event, Prepared | ModerationError]]) -> list[Decision]:
        try:
            return scorer.score_prepared(pairs, self.duplicates)
        except Exception:
            log.exception("batch_failed_isolating_items", size=len(pairs))
        # One item broke the model call (e.g. out of memory on a huge crop set): score one by one so only it
        # gets an error decision.
        out = []
        for event, p in pairs:
            try:
                out.extend(scorer.score_prepared([(event, p)]))
            except Exception as exc:
                err = ModerationError(ErrorReason.INTERNAL, f"model failed: {type(exc).__name__}: {exc}")
                out.append(error_decision(event, err, scorer.version))
        return out

    def close(self, timeout: float = 60.0) -> None:
        """Finish everything submitted (drain), then stop the threads."""
        self._stop.set()
        self._thread.join(timeout)
        self._decode.shutdown(wait=True)

    def abort(self) -> None:
        """Stop after the current batch; what is left stays unacked (redelivered later)."""
        self._abort.set()
        self._stop.set()
