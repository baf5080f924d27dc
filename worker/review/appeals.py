"""Automatically blocked items, newest first, for moderators answering appeals.

No index holds blocked decisions, so this pages back through the decisions stream (the one every decision
goes to) and keeps the events whose current decision is still the model's ``block``: an item a moderator has
since decided drops out. A page reads the stream in chunks until it has enough rows or has looked at
``scan_limit`` entries, and says where to continue.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from worker.delivery.store import DecisionStore
from worker.records import Decision, Verdict


class AppealsPage(BaseModel):
    items: list[Decision]
    older: str | None  # stream id to continue from; None when the stream is exhausted
    scanned: int


def blocked_by_model(
    store: DecisionStore,
    before: str = "+",
    limit: int = 50,
    search: str | None = None,
    scan_limit: int = 20_000,
    chunk: int = 500,
) -> AppealsPage:
    seen: set[str] = set()
    picked: list[str] = []
    scanned, cursor = 0, before
    needle = (search or "").lower().strip()
    while len(picked) < limit and scanned < scan_limit:
        rows = store.recent_decisions(chunk, cursor)
        if not rows:
            cursor = "0-0"
            break
        for stream_id, event_id, raw in rows:
            scanned += 1
            cursor = stream_id
            if event_id in seen:
                continue
            seen.add(event_id)
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if obj.get("verdict") != Verdict.BLOCK.value or obj.get("source") != "model":
                continue
            if needle and needle not in f"{obj.get('item_id', '')} {obj.get('image_uri', '')}".lower():
                continue
            picked.append(event_id)
            if len(picked) >= limit:
                break
    current = store.get_many(picked)  # still the model's block? (an override since is a later entry)
    items = [d for d in current if d is not None and d.verdict == Verdict.BLOCK and d.source == "model"]
    return AppealsPage(items=items, older=None if cursor == "0-0" else cursor, scanned=scanned)
