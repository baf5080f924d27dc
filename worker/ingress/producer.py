"""The producer API the upload pipeline uses: submit events, wait for or look up their decisions.

Submitting is ``XADD {ns}:events * event <json>`` (``{ns}:urgent`` for urgent events), the same thing any
language does (docs/queue.md). The Python side adds two things: events are validated before they leave (the
schema the worker validates on arrival), and a bounded backlog: a Lua script checks the stream's length and
adds the events in one atomic step, so past ``max_backlog`` entries :class:`BacklogFull` is raised and nothing
is added. Entries no worker has read are never trimmed. Bulk submits are one script call per chunk, all chunks
in one pipelined round trip.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis

from worker.delivery.store import DecisionStore
from worker.keys import EVENT_FIELD, Keys
from worker.records import Decision, Event, Priority
from worker.settings import Settings

# KEYS[1]: stream. ARGV: max backlog, field name, bodies... Returns the entry ids, or an error reply.
_BOUNDED_XADD = """
local len = redis.call('XLEN', KEYS[1])
local n = #ARGV - 2
if len + n > tonumber(ARGV[1]) then
  return redis.error_reply('BACKLOG ' .. len .. ' ' .. ARGV[1])
end
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i]) end
return ids
"""


class BacklogFull(RuntimeError):
    """The stream holds ``max_backlog`` entries already: workers are behind or down. Nothing was trimmed.

    ``submitted`` lists the events of a bulk call that did go in before the limit was hit.
    """

    def __init__(self, stream: str, length: int, limit: int, submitted: Sequence[Event] = ()) -> None:
        super().__init__(
            f"{stream} holds {length} entries, the limit is {limit} (MODERATION_MAX_BACKLOG): "
            "workers are behind or down; retry later"
        )
        self.stream = stream
        self.length = length
        self.limit = limit
        self.submitted = list(submitted)


class Producer:
    def __init__(self, settings: Settings) -> None:
        redis_url = settings.require_redis("the producer writes to Redis streams")
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.r: Any = redis.Redis.from_url(redis_url, decode_responses=True)
        self.store = DecisionStore(self.r, settings.namespace)
        self._xadd = self.r.register_script(_BOUNDED_XADD)

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
        """Bulk submit: one atomic bounded XADD script per chunk, every chunk in one pipelined round trip."""
        events = list(events)
        by_stream: dict[str, list[Event]] = {}
        for e in events:
            by_stream.setdefault(self._stream(e.priority == Priority.URGENT), []).append(e)
        calls: list[tuple[str, list[Event]]] = []
        pipe = self.r.pipeline(transaction=False)
        for stream, group in by_stream.items():
            for start in range(0, len(group), chunk):
                part = group[start : start + chunk]
                calls.append((stream, part))
                self._call(pipe, stream, [e.model_dump_json() for e in part])
        results = pipe.execute(raise_on_error=False) if calls else []
        sent: list[Event] = []
        for (stream, part), result in zip(calls, results, strict=True):
            if isinstance(result, Exception):
                raise self._error(stream, result, sent) from result
            sent += part
        return sent

    bulk = submit_many

    def send(self, event: Event) -> str:
        """Enqueue one event; returns its stream entry id."""
        return self.send_raw(event.model_dump_json(), event.priority == Priority.URGENT)

    def send_raw(self, raw: str | bytes, urgent: bool = False) -> str:
        """Enqueue a message body as is (dead-letter replay, malformed-input tests); returns the entry id."""
        stream = self._stream(urgent)
        try:
            return str(self._call(self.r, stream, [raw])[0])
        except redis.ResponseError as exc:
            raise self._error(stream, exc, []) from exc

    def _stream(self, urgent: bool) -> str:
        return self.keys.urgent if urgent else self.keys.events

    def _call(self, client: Any, stream: str, bodies: Sequence[str | bytes]) -> Any:
        return self._xadd(
            keys=[stream], args=[self.settings.max_backlog, EVENT_FIELD, *bodies], client=client
        )

    def _error(self, stream: str, exc: Exception, sent: list[Event]) -> Exception:
        text = str(exc)
        if text.startswith("BACKLOG "):
            _, length, limit = text.split()[:3]
            return BacklogFull(stream, int(length), int(limit), sent)
        return exc

    def backlog(self) -> dict[str, int]:
        """Entries each stream holds (not yet read, or read and not yet decided)."""
        pipe = self.r.pipeline(transaction=False)
        for s in self.keys.streams:
            pipe.xlen(s)
        return dict(zip(self.keys.streams, (int(n) for n in pipe.execute()), strict=True))

    # --- reading decisions back --------------------------------------------------------------------
    def get(self, event_id: str) -> Decision | None:
        return self.store.get(event_id)

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
        self.r.close()
