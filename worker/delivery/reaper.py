"""Re-send events the broker lost on the way to a worker.

Kombu's Redis transport takes a message off the queue (``BRPOP``) and only then records it as unacked; a
worker killed between the two loses that message for good (measured: one event in 300 lost in about one
``kill -9`` out of three on a busy 2-core machine). Late acks and the visibility timeout cannot help: the
message is in neither place.

So the :class:`~worker.ingress.producer.Producer` writes every event to an outbox first (``{ns}:pending``
sorted set by time, ``{ns}:payload`` hash), the decision write removes it (same Lua script), and one worker at
a time sweeps: an event still pending, older than the oldest message waiting in the queues (queues are FIFO,
so it is not among them) by more than a grace period, and not held by any worker (not in the unacked hash),
was lost, and is sent again. A false positive (an event between ``BRPOP`` and the unacked write of a live
worker at sweep time) only costs a duplicate delivery, which the ``SET NX`` decision write absorbs.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from worker.delivery.store import DecisionStore
from worker.process.app import Queues
from worker.records import Event
from worker.settings import Settings

log = structlog.get_logger(__name__)

UNACKED = "unacked"  # kombu's default unacked hash


def message_event(raw_message: str | bytes | dict[str, Any]) -> tuple[str, float] | None:
    """(event_id, submitted timestamp) of a kombu message carrying a decide task, if it is one of ours."""
    try:
        msg = raw_message if isinstance(raw_message, dict) else json.loads(raw_message)
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        event = Event.from_json(args[0])
    except Exception:
        return None
    return event.event_id, event.submitted_at.timestamp()


class Reaper:
    def __init__(
        self,
        settings: Settings,
        store: DecisionStore,
        send_raw: Callable[[str, bool], None],
        on_reaped: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.r: Any = store.r
        self.send_raw = send_raw
        self.on_reaped = on_reaped
        self.queues = Queues(settings.namespace)
        self.grace_s = float(settings.reap_grace_s or settings.visibility_timeout_s)
        self._last = 0.0

    def maybe_sweep(self) -> int:
        """Sweep at most every grace period, and only one worker at a time (a Redis lock)."""
        now = time.time()
        if now - self._last < self.grace_s / 2:
            return 0
        self._last = now
        lock = f"{self.settings.namespace}:reaper:lock"
        if not self.r.set(lock, "1", nx=True, ex=max(1, int(self.grace_s / 2))):
            return 0
        return self.sweep(now)

    def _oldest_queued(self, now: float) -> float:
        oldest = now
        for q in (self.queues.urgent, self.queues.events):
            tail = self.r.lindex(q, -1)  # LPUSH in, BRPOP out: the right end is next
            if tail is not None:
                found = message_event(tail)
                oldest = min(oldest, found[1] if found else 0.0)  # unparseable: assume the worst
        return oldest

    def _held(self) -> set[str]:
        held = set()
        for value in self.r.hvals(UNACKED):
            try:
                found = message_event(json.loads(value)[0])
            except (ValueError, IndexError, TypeError):
                found = None
            if found:
                held.add(found[0])
        return held

    def sweep(self, now: float | None = None, limit: int = 1000) -> int:
        now = now or time.time()
        horizon = min(self._oldest_queued(now), now) - self.grace_s
        candidates = self.r.zrangebyscore(self.store.keys.pending, "-inf", horizon, start=0, num=limit)
        if not candidates:
            return 0
        decided = self.r.pipeline(transaction=False)
        for eid in candidates:
            decided.exists(self.store.keys.decision(eid))
        held = self._held()
        resent = 0
        for eid, is_decided in zip(candidates, decided.execute(), strict=True):
            if is_decided:
                self.r.zrem(self.store.keys.pending, eid)
                self.r.hdel(self.store.keys.payload, eid)
                continue
            if eid in held:
                continue
            raw = self.r.hget(self.store.keys.payload, eid)
            if raw is None:
                self.r.zrem(self.store.keys.pending, eid)
                continue
            self.r.zadd(self.store.keys.pending, {eid: now})  # not again before another grace period
            urgent = Event.from_json(raw).priority == "urgent"
            self.send_raw(raw, urgent)
            resent += 1
            log.warning("event_resent", event_id=eid, why="lost between broker and worker")
        if resent and self.on_reaped:
            self.on_reaped(resent)
        return resent
