"""The review queue as moderators browse it: sorted by score or age, filtered by source, model, date and text.

Each moderator sees the unclaimed items and their own claims: items another moderator holds a live claim
on are left out, and so are blocked items waiting for a second review from anyone but their first moderator.

Redis keeps the queue as a sorted set by score (written by the worker in the same transaction as the
decision), so the score order is free; age order and filters need each decision's fields, which are read in
chunks of 500 with MGET and filtered here (see docs/benchmarks.md for the cost per thousand waiting items: a
queue a moderation team can work through stays below the point where a second index would pay for itself).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any, NamedTuple
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field

from worker.delivery.store import Claim, DecisionStore
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
    search: str | None = Field(
        None,
        max_length=200,
        description="Space-separated terms, all must match: a substring of the item id, URI or metadata, "
        "or key=value (a substring of that decision field or metadata key, e.g. uploader=bob).",
    )
    source: str | None = Field(None, max_length=500)
    model_version: str | None = Field(None, max_length=200)
    since: date | None = None
    until: date | None = None  # inclusive day
    offset: int = Field(0, ge=0)
    limit: int = Field(50, ge=1, le=500)

    def keep(self, row: Row) -> bool:
        if self.search and not all(_matches(row, term) for term in self.search.lower().split()):
            return False
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


def _matches(row: Row, term: str) -> bool:
    """One search term against a row; parses the row again (searches are rare, keeping every parsed
    decision alive for them would slow every page)."""
    obj = json.loads(row.raw)
    found = obj.get("metadata")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    key, eq, value = term.partition("=")
    if eq and key:
        for k, v in [*obj.items(), *meta.items()]:
            if k.lower() == key and isinstance(v, str | int | float | bool) and value in str(v).lower():
                return True
        return False
    text = f"{obj.get('item_id', '')} {obj.get('image_uri', '')} {json.dumps(meta) if meta else ''}"
    return term in text.lower()


class QueuePage(BaseModel):
    items: list[Decision]
    total: int  # after filters, visible to this moderator
    waiting: int  # the whole queue
    sources: list[str]
    model_versions: list[str]
    mine: dict[str, datetime] = {}  # this moderator's claims among the waiting items: event_id -> lease end
    held_by_others: int = 0  # waiting items other moderators hold
    second: dict[str, str] = {}  # shown items awaiting a second review: event_id -> first moderator
    oldest: datetime | None = None  # when the longest-waiting item entered the queue
    versions: dict[str, int] = {}  # shown items' decision versions, for bulk actions to send back


class View(NamedTuple):
    """Who holds what, read once per page: the claims and the second-review marks."""

    claims: dict[str, Claim]
    second: dict[str, str]

    @classmethod
    def read(cls, store: DecisionStore) -> View:
        return cls(store.claims(), store.second_reviews())

    def visible(self, event_id: str, viewer: str | None) -> bool:
        if viewer is None:
            return True
        claim = self.claims.get(event_id)
        if claim is not None and claim.moderator != viewer:
            return False
        return self.second.get(event_id) != viewer


def ordered(
    store: DecisionStore, query: QueueQuery, viewer: str | None = None, view: View | None = None
) -> tuple[list[Row], list[Row]]:
    """(matching rows ``viewer`` may work on, in the requested order; every waiting row).

    ``viewer=None`` (a tool listing the whole queue) sees every row, claimed or not.
    """
    everything = [Row.parse(e, raw) for e, raw in store.review_scan()]
    view = view or (View.read(store) if viewer is not None else View({}, {}))
    keep = [r for r in everything if query.keep(r) and view.visible(r.event_id, viewer)]
    if query.sort == Sort.OLDEST:
        keep.sort(key=lambda r: r.decided_at)
    elif query.sort == Sort.NEWEST:
        keep.sort(key=lambda r: r.decided_at, reverse=True)
    return keep, everything


def page(store: DecisionStore, query: QueueQuery, viewer: str | None = None) -> QueuePage:
    view = View.read(store)
    keep, everything = ordered(store, query, viewer, view)
    shown = keep[query.offset : query.offset + query.limit]
    waiting = {r.event_id for r in everything}
    return QueuePage(
        items=[Decision.from_json(r.raw) for r in shown],
        total=len(keep),
        waiting=len(everything),
        sources=sorted({r.source for r in everything}),
        model_versions=sorted({r.model_version for r in everything if r.model_version}),
        mine={e: c.until for e, c in view.claims.items() if c.moderator == viewer and e in waiting},
        held_by_others=sum(1 for e, c in view.claims.items() if c.moderator != viewer and e in waiting),
        second={r.event_id: view.second[r.event_id] for r in shown if r.event_id in view.second},
        oldest=min((r.decided_at for r in everything), default=None),
        versions=store.versions([r.event_id for r in shown]),
    )


def claim_next(store: DecisionStore, query: QueueQuery, viewer: str, n: int, lease_s: float) -> list[str]:
    """Top this moderator's claims up to ``n`` items of the current order (renewing those held).

    The candidates come from a snapshot; the store's claim script re-checks each one atomically, so two
    moderators claiming at once never get the same item (the loser takes the next free ones).
    """
    view = View.read(store)
    rows = ordered(store, query, viewer, view)[0]
    mine = [r.event_id for r in rows if r.event_id in view.claims]
    free = [r.event_id for r in rows if r.event_id not in view.claims]
    return store.claim([*mine, *free[: 4 * n + 50]], viewer, n, lease_s)


def neighbours(
    store: DecisionStore, query: QueueQuery, event_id: str, viewer: str | None = None
) -> tuple[str | None, str | None]:
    """(previous, next) event ids around ``event_id`` in the moderator's current ordering.

    An item no longer in the queue (just overridden) has no position; then "next" is the queue's first.
    """
    ids = [r.event_id for r in ordered(store, query, viewer)[0]]
    if event_id not in ids:
        return None, (ids[0] if ids else None)
    i = ids.index(event_id)
    return (ids[i - 1] if i > 0 else None), (ids[i + 1] if i + 1 < len(ids) else None)


def following(ids: list[str], event_id: str) -> list[str]:
    """The ids after ``event_id`` in a moderator's order, then those before it (wrapping), without it."""
    if event_id not in ids:
        return ids
    i = ids.index(event_id)
    return ids[i + 1 :] + ids[:i]
