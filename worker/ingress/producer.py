"""The producer API the upload pipeline uses: submit events, wait for or look up their decisions.

Events are validated here (the same schema the worker validates on arrival) and serialised as JSON; the
task's single argument is the event's JSON text, so a worker can dead-letter a malformed message with its
original body instead of failing inside Celery's decoder.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from worker.delivery.store import DecisionStore
from worker.errors import SchemaError
from worker.process.app import DECIDE_TASK, Queues, make_app
from worker.records import Decision, Event, Priority
from worker.settings import Settings


class Producer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = make_app(settings)
        self.queues = Queues(settings.namespace)
        assert settings.redis_url is not None  # make_app checked
        self.store = DecisionStore(
            redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.namespace
        )

    def submit(
        self,
        item_id: str,
        image_uri: str,
        *,
        priority: Priority | str = Priority.NORMAL,
        callback_url: str | None = None,
        metadata: dict[str, Any] | None = None,
        event_id: str | None = None,
    ) -> Event:
        fields: dict[str, Any] = {
            "item_id": item_id,
            "image_uri": image_uri,
            "priority": Priority(priority),
            "callback_url": callback_url,
            "metadata": metadata or {},
        }
        if event_id:
            fields["event_id"] = event_id
        event = Event.from_obj(fields)
        self.send(event)
        return event

    def submit_many(self, events: Iterable[Event], chunk: int = 1000) -> list[Event]:
        """Bulk submit over one broker connection."""
        sent: list[Event] = []
        with self.app.producer_or_acquire() as producer:
            batch: list[Event] = []
            for event in events:
                batch.append(event)
                if len(batch) >= chunk:
                    self._send_events(batch, producer)
                    sent += batch
                    batch = []
            self._send_events(batch, producer)
            sent += batch
        return sent

    def send(self, event: Event) -> None:
        self._send_events([event])

    def _send_events(self, events: list[Event], producer: Any = None) -> None:
        raws = [e.model_dump_json() for e in events]
        # Outbox first: an event the broker loses on its way to a worker is re-sent by the reaper.
        self.store.register_pending(
            (e.event_id, raw, e.submitted_at.timestamp()) for e, raw in zip(events, raws, strict=True)
        )
        for e, raw in zip(events, raws, strict=True):
            self._send_raw(raw, e.priority == Priority.URGENT, producer)

    def send_raw(self, raw: str, urgent: bool = False, *, register: bool = True) -> None:
        """Enqueue a message body as is (dead-letter replay, reaper, tests of malformed input)."""
        if register:
            try:
                event = Event.from_json(raw)
            except SchemaError:
                pass  # malformed: the worker dead-letters it; nothing to re-send
            else:
                self.store.register_pending([(event.event_id, raw, time.time())])
        self._send_raw(raw, urgent)

    def _send_raw(self, raw: str, urgent: bool, producer: Any = None) -> None:
        queue = self.queues.urgent if urgent else self.queues.events
        self.app.send_task(DECIDE_TASK, args=[raw], queue=queue, producer=producer)

    # --- reading decisions back --------------------------------------------------------------------
    def decisions(self, event_ids: list[str]) -> dict[str, Decision]:
        found: dict[str, Decision] = {}
        for start in range(0, len(event_ids), 1000):
            chunk = event_ids[start : start + 1000]
            for eid, d in zip(chunk, self.store.get_many(chunk), strict=True):
                if d is not None:
                    found[eid] = d
        return found

    def iter_decisions(
        self, event_ids: list[str], timeout: float = 60.0, poll_s: float = 0.05
    ) -> Iterator[Decision]:
        """Yield each decision as it is written, until all arrived or ``timeout`` passes."""
        pending = list(dict.fromkeys(event_ids))
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            got = self.decisions(pending)
            for eid in pending:
                if eid in got:
                    yield got[eid]
            pending = [e for e in pending if e not in got]
            if pending:
                time.sleep(poll_s)

    def wait(self, event_ids: list[str], timeout: float = 60.0) -> dict[str, Decision]:
        """Decisions of these events; the ones missing after ``timeout`` are absent from the result."""
        return {d.event_id: d for d in self.iter_decisions(event_ids, timeout)}

    def close(self) -> None:
        self.app.close()
