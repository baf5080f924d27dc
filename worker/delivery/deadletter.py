"""The dead-letter stream, read and repaired: list entries, replay them after a fix, purge the hopeless.

Workers append to ``{ns}:deadletter`` (see :mod:`worker.delivery.store`) when a message is malformed or keeps
failing. Replaying an entry resets the event's delivery counter (else the worker would dead-letter it again at
once), re-sends the original message body through the :class:`~worker.ingress.producer.Producer`, and only
then deletes the entry, so a crash in between replays it twice at worst, which the idempotent decision write
absorbs: each event is still decided once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.delivery.store import DecisionStore
from worker.errors import SchemaError
from worker.records import Event, Priority

PAGE = 500


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry; ``event`` is the parsed original message when it is a valid event."""

    id: str
    reason: str
    detail: str
    raw: str
    at: str
    event_id: str | None
    item_id: str | None
    event: Event | None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> DeadLetter:
        raw = fields.get("raw", "")
        event: Event | None
        try:
            event = Event.from_json(raw) if raw else None
        except SchemaError:
            event = None
        event_id = fields.get("event_id") or (event.event_id if event else None) or _loose_id(raw)
        known = {"reason", "detail", "raw", "at", "event_id"}
        return cls(
            id=entry_id,
            reason=fields.get("reason", ""),
            detail=fields.get("detail", ""),
            raw=raw,
            at=fields.get("at", ""),
            event_id=event_id,
            item_id=event.item_id if event else None,
            event=event,
            extra={k: v for k, v in fields.items() if k not in known},
        )

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "event_id": self.event_id,
            "item_id": self.item_id,
            "at": self.at,
            "replayable": self.event is not None,
        }


def _loose_id(raw: str) -> str | None:
    """A malformed message may still name its event; show it so the producer side can be found."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    value = obj.get("event_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


@dataclass
class ReplayReport:
    replayed: list[DeadLetter] = field(default_factory=list)
    skipped: list[DeadLetter] = field(default_factory=list)


class DeadLetterQueue:
    def __init__(self, store: DecisionStore) -> None:
        self.store = store
        self.r = store.r
        self.key = store.keys.deadletter

    def __len__(self) -> int:
        return int(self.r.xlen(self.key))

    def entries(self) -> Iterator[DeadLetter]:
        """Every entry, oldest first, read in pages (the stream can be long)."""
        start = "-"
        while True:
            page = self.r.xrange(self.key, min=start, count=PAGE)
            for entry_id, fields in page:
                yield DeadLetter.from_entry(str(entry_id), dict(fields))
            if len(page) < PAGE:
                return
            start = f"({page[-1][0]}"

    def select(
        self, *, reasons: list[str] | None = None, ids: list[str] | None = None, everything: bool = False
    ) -> list[DeadLetter]:
        """Entries matching any given reason or stream id / event id; ``everything`` selects all."""
        if not (everything or reasons or ids):
            raise ValueError("select entries with a reason, an id, or everything")
        wanted_reasons, wanted_ids = set(reasons or []), set(ids or [])
        return [
            d
            for d in self.entries()
            if everything or d.reason in wanted_reasons or d.id in wanted_ids or d.event_id in wanted_ids
        ]

    def replay(
        self,
        letters: list[DeadLetter],
        send_raw: Callable[[str, bool], None],
        *,
        force: bool = False,
        progress: Callable[[DeadLetter], None] | None = None,
    ) -> ReplayReport:
        """Re-enqueue each entry's original message and remove it from the stream.

        Entries whose message is not a valid event would only be dead-lettered again; they are skipped
        unless ``force`` (after the consumer's schema was fixed).
        """
        report = ReplayReport()
        for letter in letters:
            if (letter.event is None and not force) or not letter.raw:
                report.skipped.append(letter)
                continue
            if letter.event_id:
                self.store.forget_deliveries([letter.event_id])
            urgent = letter.event is not None and letter.event.priority == Priority.URGENT
            send_raw(letter.raw, urgent)
            self.r.xdel(self.key, letter.id)
            report.replayed.append(letter)
            if progress is not None:
                progress(letter)
        return report

    def purge(self, letters: list[DeadLetter]) -> int:
        ids = [d.id for d in letters]
        deleted = 0
        for start in range(0, len(ids), PAGE):
            deleted += int(self.r.xdel(self.key, *ids[start : start + PAGE]))
        return deleted
