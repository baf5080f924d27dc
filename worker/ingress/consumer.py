"""The stream consumer: reads ``{ns}:urgent`` then ``{ns}:events`` in batches through the ``workers`` group.

One thread per worker process, no thread or task per event:

* **Read.** ``XREADGROUP COUNT n`` on the urgent stream, then on both streams (``BLOCK`` briefly when both are
  empty) for what is left of ``n`` (``read_count``, default ``max_batch``). At most ``prefetch`` entries are
  held (read, not yet acked); past that the consumer waits for the batcher.
* **Validate.** Every entry goes through :func:`worker.ingress.stream.parse_entry` first; what cannot become
  an event is dead-lettered whole, with the reason, and acked in one script. Nothing an entry holds can stop
  the loop.
* **Decide.** Events go straight to the :class:`~worker.scoring.batcher.Batcher`; its one script per batch
  writes the decisions and ``XACK`` + ``XDEL`` their entries.
* **Reclaim.** Every ``reclaim_interval_s``, ``XAUTOCLAIM`` takes entries idle longer than the visibility
  timeout (a dead worker's). Their delivery count comes from the pending entries list (``XPENDING``); past
  ``max_deliveries`` the entry is dead-lettered (``redelivery_limit``) instead of decided. Entries this worker
  holds for long (a slow batch) are refreshed with ``XCLAIM ... JUSTID`` (which does not count a delivery), so
  only a dead worker's entries ever go idle.
* **Drain.** :meth:`stop_reading` stops reading; :meth:`drain` waits until every held entry is decided.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from worker.delivery.store import Ack, DecisionStore
from worker.ingress.stream import DeadLetterReason, Rejected, parse_entry
from worker.keys import Keys
from worker.ops.metrics import Metrics
from worker.records import Event
from worker.scoring.batcher import Batcher, Job
from worker.settings import Settings

log = structlog.get_logger(__name__)

Entry = tuple[str, str, dict[Any, Any], int]  # stream, entry id, fields, deliveries


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def ensure_groups(client: Any, keys: Keys) -> None:
    """Create the consumer group on both streams (from the start: entries added before any worker count)."""
    for stream in keys.streams:
        try:
            client.xgroup_create(stream, keys.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


class StreamConsumer:
    def __init__(
        self,
        settings: Settings,
        client: Any,
        store: DecisionStore,
        batcher: Batcher,
        metrics: Metrics,
        name: str,
        on_dead_letter: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.r = client  # bytes replies: an entry's body is kept exactly as the producer wrote it
        self.store = store
        self.batcher = batcher
        self.metrics = metrics
        self.name = name
        self.keys = store.keys
        self.on_dead_letter = on_dead_letter
        self.read_count = settings.read_count or settings.max_batch
        self._kind = {self.keys.urgent: "urgent", self.keys.events: "events"}
        self._held: dict[Ack, float] = {}  # entry -> when it was read or last refreshed
        self._cond = threading.Condition()
        self._reading = threading.Event()
        self._thread: threading.Thread | None = None
        self._cursors = {s: "0-0" for s in self.keys.streams}
        self._next_reclaim = 0.0
        self.entries_read = 0

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> StreamConsumer:
        if self._thread is None:
            ensure_groups(self.r, self.keys)
            self._reading.set()
            self._thread = threading.Thread(target=self._run, name="stream-consumer", daemon=True)
            self._thread.start()
        return self

    def stop_reading(self) -> None:
        """Read no more entries (the first stop signal); what is held is still decided and acked."""
        if self._reading.is_set():
            log.info("stream_consumer_stopping", held=self.held)
        self._reading.clear()

    def drain(self, timeout: float) -> bool:
        """Stop reading and wait until every held entry is settled; False if some are still held."""
        self.stop_reading()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._held and time.monotonic() < deadline:
                self._cond.wait(0.1)
            drained = not self._held
        if drained and self._thread is not None:
            self._leave_group()
        return drained

    def _leave_group(self) -> None:
        """Holding nothing, leave the group, so ``XINFO CONSUMERS`` lists live workers only."""
        for stream in self.keys.streams:
            try:
                if not self.r.xpending_range(stream, self.keys.group, "-", "+", 1, consumername=self.name):
                    self.r.xgroup_delconsumer(stream, self.keys.group, self.name)
            except redis.RedisError as exc:
                log.warning("leave_group_failed", stream=stream, error=str(exc))

    @property
    def held(self) -> int:
        with self._cond:
            return len(self._held)

    def settled(self, acks: list[Ack | None]) -> None:
        """The batcher decided (or gave up on) these entries: they are no longer held."""
        with self._cond:
            for a in acks:
                if a is not None:
                    self._held.pop(a, None)
            self.metrics.in_flight.set(len(self._held))
            self._cond.notify_all()

    # --- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.2
        while self._reading.is_set():
            try:
                self._step()
                backoff = 0.2
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream or group was deleted (or Redis lost its data)
                    log.warning("consumer_group_missing", error=str(exc), action="recreating")
                    self._safely(lambda: ensure_groups(self.r, self.keys))
                else:
                    log.error("redis_error", error=str(exc))
                    time.sleep(backoff)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("redis_unreachable", error=str(exc), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception:  # a bug must not stop consumption; the entries involved stay pending
                log.exception("consumer_step_failed")
                time.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    def _safely(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except redis.RedisError as exc:
            log.warning("redis_error", error=str(exc))

    def _step(self) -> None:
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.settings.reclaim_interval_s
            self._refresh(now)
            self._reclaim()
        room = self.settings.prefetch - self.held
        if room <= 0:
            with self._cond:
                self._cond.wait(0.05)
            return
        entries = self._read(min(room, self.read_count))
        if entries:
            self._dispatch(entries)

    def _read(self, n: int) -> list[Entry]:
        urgent, events = self.keys.streams
        got = self._flatten(self.r.xreadgroup(self.keys.group, self.name, {urgent: ">"}, count=n))
        if len(got) < n:
            streams = {events: ">"} if got else {urgent: ">", events: ">"}
            block = None if got else self.settings.read_block_ms
            got += self._flatten(
                self.r.xreadgroup(self.keys.group, self.name, streams, count=n - len(got), block=block)
            )
        return got

    def _flatten(self, reply: Any, deliveries: int = 1) -> list[Entry]:
        out: list[Entry] = []
        for stream, entries in reply or []:
            name = _s(stream)
            for entry_id, fields in entries:
                out.append((name, _s(entry_id), fields or {}, deliveries))
        return out

    def _dispatch(self, entries: list[Entry]) -> None:
        self.entries_read += len(entries)
        now = time.monotonic()
        jobs: list[Job] = []
        with self._cond:
            for stream, entry_id, _, _ in entries:
                self._held[(stream, entry_id)] = now
            self.metrics.in_flight.set(len(self._held))
        for stream, entry_id, fields, deliveries in entries:
            ack = (stream, entry_id)
            try:
                job = self._admit(ack, fields, deliveries)
            except Exception:  # a bug or Redis away: release it; it stays pending and comes back reclaimed
                log.exception("entry_not_admitted", entry_id=entry_id)
                self.settled([ack])
                continue
            if job is not None:
                jobs.append(job)
        if jobs:
            self.batcher.submit(jobs)

    def _admit(self, ack: Ack, fields: dict[Any, Any], deliveries: int) -> Job | None:
        """The entry as a job for the batcher, or None once it is dead-lettered (and acked)."""
        stream, entry_id = ack
        parsed = parse_entry(self._kind[stream], entry_id, fields, self.settings.max_event_bytes)
        if isinstance(parsed, Rejected):
            self._dead_letter(ack, parsed.reason, parsed.detail, parsed.raw, parsed.event_id, deliveries)
            return None
        if deliveries > self.settings.max_deliveries:
            detail = (
                f"delivered {deliveries} times without a decision (max_deliveries "
                f"{self.settings.max_deliveries}): workers crashed or stalled while deciding it"
            )
            raw: bytes | str = fields.get(b"event") or fields.get("event") or b""
            self._dead_letter(
                ack, DeadLetterReason.REDELIVERY_LIMIT, detail, raw, parsed.event_id, deliveries
            )
            return None
        self._observe_wait(parsed)
        return Job(parsed, ack)

    def _observe_wait(self, event: Event) -> None:
        waited = time.time() - event.submitted_at.timestamp()
        self.metrics.queue_wait.observe(max(0.0, waited))

    def _dead_letter(
        self,
        ack: Ack,
        reason: DeadLetterReason,
        detail: str,
        raw: bytes | str,
        event_id: str,
        deliveries: int,
    ) -> None:
        extra = {"event_id": event_id} if event_id else {}
        try:
            self.store.dead_letter(reason.value, detail, raw, ack=ack, deliveries=str(deliveries), **extra)
        except redis.RedisError as exc:  # still pending: reclaimed and dead-lettered again later
            log.warning("dead_letter_failed", entry_id=ack[1], error=str(exc))
            self.settled([ack])
            return
        self.settled([ack])
        self.metrics.dead_letters.labels(reason.value).inc()
        log.warning(
            "dead_lettered",
            reason=reason.value,
            detail=detail[:300],
            entry_id=ack[1],
            event_id=event_id or None,
        )
        if self.on_dead_letter is not None:
            self.on_dead_letter(reason.value)

    # --- crashed consumers' entries ------------------------------------------------------------------
    def _refresh(self, now: float) -> None:
        """Reset the idle time of entries held for a while, so no other worker reclaims them."""
        horizon = now - self.settings.visibility_timeout_s / 3
        with self._cond:
            old = [a for a, t in self._held.items() if t < horizon]
            for a in old:
                self._held[a] = now
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in old:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            self.r.xclaim(stream, self.keys.group, self.name, 0, ids, justid=True)

    def _reclaim(self) -> None:
        idle_ms = self.settings.visibility_timeout_s * 1000
        for stream in self.keys.streams:
            room = self.settings.prefetch - self.held
            if room <= 0:
                return
            reply = self.r.xautoclaim(
                stream, self.keys.group, self.name, idle_ms, start_id=self._cursors[stream], count=room
            )
            cursor, claimed = _s(reply[0]), reply[1]
            self._cursors[stream] = cursor
            with self._cond:
                held = set(self._held)
            entries = [
                (stream, _s(i), f or {}) for i, f in claimed if f is not None and (stream, _s(i)) not in held
            ]
            if not entries:
                continue
            counts = self._delivery_counts(stream, [e[1] for e in entries])
            out = [(s, i, f, counts.get(i, self.settings.max_deliveries + 1)) for s, i, f in entries]
            log.warning(
                "entries_reclaimed", stream=stream, n=len(out), idle_s=self.settings.visibility_timeout_s
            )
            self._dispatch(out)

    def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        """How often each entry was delivered, from the pending entries list (this claim included)."""
        lo, hi = min(ids, key=_id_key), max(ids, key=_id_key)
        rows = self.r.xpending_range(stream, self.keys.group, lo, hi, len(ids) + 1000, consumername=self.name)
        wanted = set(ids)
        return {_s(r["message_id"]): int(r["times_delivered"]) for r in rows if _s(r["message_id"]) in wanted}


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
