"""The dead-letter stream, read and repaired: list entries, replay them after a fix, purge the hopeless.

Workers append to ``{ns}:deadletter`` (:meth:`worker.delivery.store.DecisionStore.dead_letter`, in the same
script that acks the stream entry) when an entry is malformed, of a newer major schema version, too large, or
was delivered more than ``max_deliveries`` times. The whole body is kept (``raw``; base64 with
``raw_encoding=base64`` when it is not UTF-8), never truncated, so every entry can be replayed. Replaying
re-adds the original body to its stream as a new entry (a fresh delivery count) and only then deletes the
dead letter, so a crash in between replays it twice at worst, which the idempotent decision write absorbs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.delivery.store import DecisionStore
from worker.errors import SchemaError
from worker.records import Event, Priority, loose_event_id, utcnow

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
        if fields.get("raw_encoding") == "base64":
            raw = base64.b64decode(raw).decode("utf-8", "replace")
        event: Event | None
        context = {"event_id": fields.get("event_id") or entry_id, "submitted_at": utcnow()}
        try:
            event = Event.from_json(raw, context=context) if raw else None
        except SchemaError:
            event = None
        event_id = (
            fields.get("event_id") or (event.event_id if event else None) or loose_event_id(raw) or None
        )
        known = {"reason", "detail", "raw", "raw_encoding", "at", "event_id"}
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
            "bytes": len(self.raw),
        }

    def body(self) -> str:
        """What to re-send: the original body, with the event id it was known by when the body named none
        (an entry's id stood in for it), so a replay settles the same event."""
        if self.event is None or not self.event_id:
            return self.raw
        try:
            obj = json.loads(self.raw)
        except ValueError:
            return self.raw
        if isinstance(obj, dict) and "event_id" not in obj:
            obj["event_id"] = self.event_id
            return json.dumps(obj)
        return self.raw


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
        send_raw: Callable[[str, bool], object],
        *,
        force: bool = False,
        progress: Callable[[DeadLetter], None] | None = None,
    ) -> ReplayReport:
        """Re-enqueue each entry's original message and remove it from the dead-letter stream.

        Entries whose message is not a valid event would only be dead-lettered again; they are skipped
        unless ``force`` (after the workers were upgraded to read them).
        """
        report = ReplayReport()
        for letter in letters:
            if (letter.event is None and not force) or not letter.raw:
                report.skipped.append(letter)
                continue
            urgent = (letter.event is not None and letter.event.priority == Priority.URGENT) or (
                letter.extra.get("stream", "").endswith(":urgent")
            )
            send_raw(letter.body(), urgent)
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
