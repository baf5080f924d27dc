"""Cross-event micro-batching: crops from many events share one model call.

Events arrive one per Celery thread. Each is fetched, decoded and cropped on a small decode pool (so the next
batch is prepared while the model runs; on CUDA a JPEG is only planned there and decoded with its batch on
the GPU, see worker/jpeg.py), then queued for the single model thread, which takes items until it
holds ``max_batch`` crops or the oldest has waited ``max_wait_ms``. The model thread asks its
:class:`ScorerSource` for the model once per batch: that call is the hot-reload seam, so a swap always falls
between two batches. Decisions of a batch are written in one Redis round trip, then every waiting task is
released to ack its message.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from worker.delivery.store import DecisionStore
from worker.errors import ErrorReason, ModerationError
from worker.media.fetch import Fetcher
from worker.media.jpeg import Pending
from worker.ops.metrics import Metrics
from worker.records import Decision, Event
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


@dataclass
class Outcome:
    """What a waiting task learns: the decision and whether this delivery wrote it (False: a duplicate)."""

    decision: Decision
    written: bool


@dataclass
class _Item:
    event: Event
    prepared: Prepared | Pending | ModerationError
    future: Future[Outcome]
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def n_crops(self) -> int:
        p = self.prepared
        if isinstance(p, Prepared):
            return len(p.crops)
        return len(p.boxes) if isinstance(p, Pending) else 0


class Batcher:
    def __init__(
        self,
        source: ScorerSource,
        fetcher: Fetcher,
        settings: Settings,
        metrics: Metrics,
        store: DecisionStore,
        name: str = "batcher",
    ) -> None:
        self.name = name
        self.source = source
        self.fetcher = fetcher
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self._ready: queue.Queue[_Item] = queue.Queue()
        self._decode = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="decode")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.batches = 0

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def submit(self, event: Event) -> Future[Outcome]:
        fut: Future[Outcome] = Future()
        self._decode.submit(self._prepare, event, fut)
        return fut

    def _prepare(self, event: Event, fut: Future[Outcome]) -> None:
        try:
            scorer = self.source.current()
            prepared = prepare_or_error(
                event.image_uri, self.fetcher, scorer.spec, defer_jpeg=scorer.defers_jpeg
            )
        except Exception as exc:  # never strand a waiting task
            prepared = ModerationError(ErrorReason.INTERNAL, f"{type(exc).__name__}: {exc}")
        self._ready.put(_Item(event, prepared, fut))

    # --- the model thread ----------------------------------------------------------------------------
    def _collect(self) -> list[_Item]:
        try:
            first = self._ready.get(timeout=0.1)
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

    def _run(self) -> None:
        while not self._stop.is_set() or not self._ready.empty():
            items = self._collect()
            if items:
                self._process(items)

    def _process(self, items: list[_Item]) -> None:
        scorer = self.source.current()
        planned: list[tuple[Event, Prepared | Pending | ModerationError]] = []
        for it in items:
            p = it.prepared
            if isinstance(p, Prepared) and p.crops.shape[1] != scorer.spec.size:
                # the model was swapped for one with another window between decode and batch: recut
                p = prepare_or_error(it.event.image_uri, self.fetcher, scorer.spec)
            planned.append((it.event, p))
        # Device JPEG decode of the whole batch (Pending items of a swapped model are recut by Pillow there).
        try:
            pairs = scorer.materialize(planned)
        except Exception as exc:  # never strand a waiting task, even on a bug in there
            log.exception("materialize_failed", size=len(planned))
            err = ModerationError(ErrorReason.INTERNAL, f"device decode failed: {type(exc).__name__}: {exc}")
            pairs = [(e, err if isinstance(p, Pending) else p) for e, p in planned]
        t0 = time.perf_counter()
        batch_id = f"{self.name}:{self.batches}"
        decisions = [d.model_copy(update={"batch_id": batch_id}) for d in self._score(scorer, pairs)]
        model_s = time.perf_counter() - t0
        try:
            written = self.store.write_many(decisions)
            self.store.forget_deliveries([d.event_id for d in decisions])
        except Exception as exc:  # Redis unreachable: let each task retry its own message
            for it in items:
                it.future.set_exception(exc)
            return
        self.batches += 1
        n_crops = sum(it.n_crops for it in items)
        if n_crops:
            self.metrics.batch_size.observe(n_crops)
            self.metrics.model_time.observe(model_s)
        self.metrics.observe_timings(d.timings_ms for d in decisions)
        for it, decision, was_written in zip(items, decisions, written, strict=True):
            it.future.set_result(Outcome(decision, was_written))
        try:
            self.source.observe(pairs, decisions, model_s)
        except Exception:
            log.exception("observe_failed")

    def _score(self, scorer: Scorer, pairs: list[tuple[Event, Prepared | ModerationError]]) -> list[Decision]:
        try:
            return scorer.score_prepared(pairs)
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
        self._decode.shutdown(wait=True)
        self._stop.set()
        self._thread.join(timeout)
