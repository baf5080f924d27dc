"""The review queue as moderators browse it: sorted by score or age, filtered by source, model and date.

Redis keeps the queue as a sorted set by score (written by the worker in the same transaction as the
decision), so the score order is free; age order and filters need each decision's fields, which are read in
chunks of 500 with MGET and filtered here (see docs/benchmarks.md for the cost per thousand waiting items: a
queue a moderation team can work through stays below the point where a second index would pay for itself).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import NamedTuple
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field

from worker.delivery.store import DecisionStore
from worker.records import Decision
from worker.review.media import uri_source


class Sort(StrEnum):
    SCORE = "score"  # most likely AI first
    OLDEST = "oldest"  # waiting longest first
    NEWEST = "newest"


class Row(NamedTuple):
    """The fields the queue sorts and filters on, read with ``json.loads`` (5x cheaper than a full model)."""

    event_id: str
    decided_at: datetime
    model_version: str | None
    source: str
    raw: str

    @classmethod
    def parse(cls, event_id: str, raw: str) -> Row:
        obj = json.loads(raw)
        meta = obj.get("metadata")
        source = meta.get("source") if isinstance(meta, dict) else None
        at = datetime.fromisoformat(obj["decided_at"])
        return cls(
            event_id=event_id,
            decided_at=at if at.tzinfo else at.replace(tzinfo=UTC),
            model_version=obj.get("model_version"),
            source=source if isinstance(source, str) and source else uri_source(obj["image_uri"]),
            raw=raw,
        )


class QueueQuery(BaseModel):
    """What the queue page and ``GET /api/queue`` accept; unknown values are a 422, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    sort: Sort = Sort.SCORE
    source: str | None = Field(None, max_length=500)
    model_version: str | None = Field(None, max_length=200)
    since: date | None = None
    until: date | None = None  # inclusive day
    offset: int = Field(0, ge=0)
    limit: int = Field(50, ge=1, le=500)

    def keep(self, row: Row) -> bool:
        if self.source and row.source != self.source:
            return False
        if self.model_version and row.model_version != self.model_version:
            return False
        if self.since and row.decided_at < datetime.combine(self.since, time.min, UTC):
            return False
        return not (
            self.until and row.decided_at >= datetime.combine(self.until + timedelta(days=1), time.min, UTC)
        )

    def params(self, **changes: object) -> str:
        """This query as a URL query string (for links that keep the moderator's filters)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data.update({k: v for k, v in changes.items()})
        return urlencode({k: v for k, v in data.items() if v not in (None, "")})


class QueuePage(BaseModel):
    items: list[Decision]
    total: int  # after filters
    waiting: int  # the whole queue
    sources: list[str]
    model_versions: list[str]


def ordered(store: DecisionStore, query: QueueQuery) -> tuple[list[Row], list[Row]]:
    """(matching rows in the requested order, every waiting row)."""
    everything = [Row.parse(e, raw) for e, raw in store.review_scan()]
    keep = [r for r in everything if query.keep(r)]  # already highest score first
    if query.sort == Sort.OLDEST:
        keep.sort(key=lambda r: r.decided_at)
    elif query.sort == Sort.NEWEST:
        keep.sort(key=lambda r: r.decided_at, reverse=True)
    return keep, everything


def page(store: DecisionStore, query: QueueQuery) -> QueuePage:
    keep, everything = ordered(store, query)
    return QueuePage(
        items=[Decision.from_json(r.raw) for r in keep[query.offset : query.offset + query.limit]],
        total=len(keep),
        waiting=len(everything),
        sources=sorted({r.source for r in everything}),
        model_versions=sorted({r.model_version for r in everything if r.model_version}),
    )


def neighbours(store: DecisionStore, query: QueueQuery, event_id: str) -> tuple[str | None, str | None]:
    """(previous, next) event ids around ``event_id`` in the moderator's current ordering.

    An item no longer in the queue (just overridden) has no position; then "next" is the queue's first.
    """
    ids = [r.event_id for r in ordered(store, query)[0]]
    if event_id not in ids:
        return None, (ids[0] if ids else None)
    i = ids.index(event_id)
    return (ids[i - 1] if i > 0 else None), (ids[i + 1] if i + 1 < len(ids) else None)
