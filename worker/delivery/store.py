"""Where decisions go: the one place that knows the Redis key layout the pipeline, page and trainer share.

Keys (``ns`` = settings.namespace)::

    {ns}:decision:{event_id}   JSON Decision; written with SET NX, so a redelivered event cannot decide twice
    {ns}:item:{item_id}        event_id of the item's latest decision (an override rewrites the decision)
    {ns}:audit:{event_id}      list: one event's override audit entries (copies from {ns}:overrides)
    {ns}:decisions             stream: one entry per decision or override, for the upload pipeline
    {ns}:review                sorted set of event_ids awaiting a moderator, by ai_score (highest first)
    {ns}:overrides             stream: append-only audit log of moderator actions
    {ns}:deadletter            stream: events that could not be decided, with the reason
    {ns}:deliveries:{event_id} deliveries of an undecided event (bounded redelivery); deleted once decided
    {ns}:worker:{hostname}     hash: a live worker's heartbeat (model version, pid, ready), with a TTL
    {ns}:pending               sorted set: event ids submitted through the Producer and not yet decided, by
                               submit (or last re-send) time; with {ns}:payload (hash event_id -> event JSON)
                               it is the outbox the reaper re-sends from (worker/reaper.py)

The first write of a decision and its stream entry and review-queue entry happen in one MULTI/EXEC after the
NX check, so a crash between them cannot leave a decision without its stream entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from worker.records import Decision, Verdict, utcnow

STREAM_MAXLEN = 1_000_000


@dataclass(frozen=True)
class Keys:
    ns: str

    def decision(self, event_id: str) -> str:
        return f"{self.ns}:decision:{event_id}"

    def item(self, item_id: str) -> str:
        return f"{self.ns}:item:{item_id}"

    def audit(self, event_id: str) -> str:
        return f"{self.ns}:audit:{event_id}"

    @property
    def decisions(self) -> str:
        return f"{self.ns}:decisions"

    @property
    def review(self) -> str:
        return f"{self.ns}:review"

    @property
    def overrides(self) -> str:
        return f"{self.ns}:overrides"

    @property
    def deadletter(self) -> str:
        return f"{self.ns}:deadletter"

    @property
    def pending(self) -> str:
        return f"{self.ns}:pending"

    @property
    def payload(self) -> str:
        return f"{self.ns}:payload"

    def deliveries(self, event_id: str) -> str:
        return f"{self.ns}:deliveries:{event_id}"

    def worker(self, hostname: str) -> str:
        return f"{self.ns}:worker:{hostname}"


# Lua keeps the NX check and the three writes atomic and in one round trip.
_WRITE_ONCE = """
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('HDEL', KEYS[6], ARGV[2])
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event_id', ARGV[2], 'decision', ARGV[1])
  if ARGV[3] == '1' then redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2]) end
  return 1
end
return 0
"""


class DecisionStore:
    def __init__(self, client: redis.Redis, namespace: str = "moderation") -> None:
        self.r: Any = client  # redis-py's stubs type stream replies too loosely to be useful
        self.keys = Keys(namespace)
        self._write_once = client.register_script(_WRITE_ONCE)

    @classmethod
    def from_url(cls, url: str, namespace: str = "moderation") -> DecisionStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), namespace)

    # --- writes by the worker ---------------------------------------------------------------------
    def write(self, decision: Decision) -> bool:
        """Record a decision once; returns False if this event was already decided (a redelivery)."""
        return bool(self._write_args(self.r, decision))

    def write_many(self, decisions: Iterable[Decision]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for d in decisions:
            self._write_args(pipe, d)
        return [bool(x) for x in pipe.execute()]

    def _write_args(self, client: Any, d: Decision) -> Any:
        keys = [
            self.keys.decision(d.event_id),
            self.keys.item(d.item_id),
            self.keys.decisions,
            self.keys.review,
            self.keys.pending,
            self.keys.payload,
        ]
        review = "1" if d.verdict == Verdict.REVIEW else "0"
        argv: list[str | float] = [d.to_json(), d.event_id, review, d.ai_score or 0.0, STREAM_MAXLEN]
        return self._write_once(keys=keys, args=argv, client=client)

    def count_delivery(self, event_id: str, ttl_s: int = 7 * 86400) -> tuple[int, bool]:
        """Count this delivery; returns (deliveries so far, already decided) in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(self.keys.deliveries(event_id))
        pipe.expire(self.keys.deliveries(event_id), ttl_s)
        pipe.exists(self.keys.decision(event_id))
        n, _, decided = pipe.execute()
        return int(n), bool(decided)

    def forget_deliveries(self, event_ids: list[str]) -> None:
        if event_ids:
            self.r.delete(*[self.keys.deliveries(e) for e in event_ids])

    def dead_letter(self, reason: str, detail: str, raw: str | bytes | None = None, **fields: str) -> str:
        body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
        entry = {"reason": reason, "detail": detail[:2000], "raw": body[:100_000], "at": utcnow().isoformat()}
        entry.update({k: str(v) for k, v in fields.items()})
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.keys.deadletter, entry, maxlen=STREAM_MAXLEN, approximate=True)
        if fields.get("event_id"):  # settled: the reaper must not re-send it
            pipe.zrem(self.keys.pending, fields["event_id"])
            pipe.hdel(self.keys.payload, fields["event_id"])
        return str(pipe.execute()[0])

    def register_pending(self, events: Iterable[tuple[str, str, float]]) -> None:
        """Record (event_id, event JSON, submitted timestamp) before sending: the outbox the reaper uses."""
        pipe = self.r.pipeline(transaction=False)
        for event_id, raw, ts in events:
            pipe.hset(self.keys.payload, event_id, raw)
            pipe.zadd(self.keys.pending, {event_id: ts})
        pipe.execute()

    # --- reads -------------------------------------------------------------------------------------
    def get(self, event_id: str) -> Decision | None:
        raw = self.r.get(self.keys.decision(event_id))
        return None if raw is None else Decision.from_json(raw)

    def get_item(self, item_id: str) -> Decision | None:
        event_id = self.r.get(self.keys.item(item_id))
        return None if event_id is None else self.get(str(event_id))

    def get_many(self, event_ids: list[str]) -> list[Decision | None]:
        if not event_ids:
            return []
        raws = self.r.mget([self.keys.decision(e) for e in event_ids])
        return [None if r is None else Decision.from_json(r) for r in raws]

    def review_queue(self, offset: int = 0, limit: int = 50) -> list[tuple[str, float]]:
        """(event_id, ai_score), highest score first."""
        rows = self.r.zrevrange(self.keys.review, offset, offset + limit - 1, withscores=True)
        return [(str(e), float(s)) for e, s in rows]

    def review_count(self) -> int:
        return int(self.r.zcard(self.keys.review))

    def dead_letters(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        return [(str(i), dict(f)) for i, f in self.r.xrange(self.keys.deadletter, count=count)]

    # --- writes by moderators ----------------------------------------------------------------------
    def override(self, event_id: str, verdict: Verdict, moderator: str, note: str = "") -> Decision:
        """Replace a decision's verdict, audit it, publish it and take the item off the review queue."""
        current = self.get(event_id)
        if current is None:
            raise KeyError(event_id)
        updated = current.model_copy(
            update={"verdict": verdict, "source": f"moderator:{moderator}", "decided_at": utcnow()}
        )
        audit = {
            "event_id": event_id,
            "item_id": current.item_id,
            "image_uri": current.image_uri,
            "moderator": moderator,
            "previous_verdict": current.verdict.value,
            "verdict": verdict.value,
            "ai_score": "" if current.ai_score is None else repr(current.ai_score),
            "model_version": current.model_version or "",
            "previous_source": current.source,
            "previous_decided_at": current.decided_at.isoformat(),
            "note": note[:2000],
            "at": utcnow().isoformat(),
        }
        from worker.delivery.webhook import WebhookQueue  # the final verdict reaches the event's callback too

        hooks = WebhookQueue(self.r, self.keys.ns)
        callback = hooks.callback_of(event_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.decision(event_id), updated.to_json())
        pipe.xadd(self.keys.overrides, audit)
        pipe.rpush(self.keys.audit(event_id), json.dumps(audit))
        pipe.xadd(
            self.keys.decisions,
            {"event_id": event_id, "decision": updated.to_json()},
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
        pipe.zrem(self.keys.review, event_id)
        if callback is not None:  # in the same MULTI: an override never misses its callback
            hooks.enqueue(callback, updated, remember=False, pipe=pipe)
        pipe.execute()
        return updated

    def overrides(self, count: int | None = None) -> list[dict[str, str]]:
        return [dict(f) for _, f in self.r.xrange(self.keys.overrides, count=count)]

    # --- reads for the review page -----------------------------------------------------------------
    def review_scan(self, chunk: int = 500, limit: int = 100_000) -> Iterator[tuple[str, str]]:
        """(event_id, decision JSON) awaiting review, highest score first, read in chunks of MGET.

        Raw JSON, because the page filters thousands of them on a few fields and parses only what it shows.
        """
        for start in range(0, limit, chunk):
            ids = [str(e) for e in self.r.zrevrange(self.keys.review, start, min(start + chunk, limit) - 1)]
            if ids:
                raws = self.r.mget([self.keys.decision(e) for e in ids])
                yield from ((e, str(raw)) for e, raw in zip(ids, raws, strict=True) if raw is not None)
            if len(ids) < chunk:
                return

    def in_review(self, event_id: str) -> bool:
        return self.r.zscore(self.keys.review, event_id) is not None

    def audit_of(self, event_id: str) -> list[dict[str, str]]:
        """One event's overrides, oldest first."""
        return [json.loads(x) for x in self.r.lrange(self.keys.audit(event_id), 0, -1)]

    def recent_overrides(self, count: int = 100, before: str = "+") -> list[tuple[str, dict[str, str]]]:
        """The audit log newest first; ``before`` is an exclusive stream id for paging."""
        if before == "0-0":
            return []  # nothing is older; Redis refuses the exclusive range "(0-0"
        end = before if before == "+" else f"({before}"
        return [(str(i), dict(f)) for i, f in self.r.xrevrange(self.keys.overrides, end, "-", count=count)]


def decision_from_stream(fields: dict[str, str]) -> Decision:
    return Decision.from_json(fields["decision"])


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
