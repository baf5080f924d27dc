"""Where decisions go: the one place that knows the Redis key layout the pipeline, page and trainer share.

Keys (``ns`` = settings.namespace)::

    {ns}:decision:{event_id}   JSON Decision; written with SET NX, so a redelivered event cannot decide twice
    {ns}:item:{item_id}        event_id of the item's latest decision (an override rewrites the decision)
    {ns}:audit:{event_id}      list: one event's override audit entries (copies from {ns}:overrides)
    {ns}:decisions             stream: one entry per decision or override, for the upload pipeline
    {ns}:review                sorted set of event_ids awaiting a moderator, by ai_score (highest first)
    {ns}:claims                hash: event_id -> "moderator<TAB>lease end (Redis ms)" of claimed queue items
    {ns}:second                hash: event_id -> first moderator, for blocked items awaiting a second review
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
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
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
    def claims(self) -> str:
        return f"{self.ns}:claims"

    @property
    def second(self) -> str:
        return f"{self.ns}:second"

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


# A claim value is "moderator<TAB>expiry in Redis milliseconds"; a lease past its expiry holds nothing.
_HOLDER = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function holder(value, now)
  if not value then return nil, nil end
  local sep = string.find(value, '\t', 1, true)
  if not sep then return nil, nil end
  local expiry = tonumber(string.sub(value, sep + 1))
  if not expiry or expiry <= now then return nil, nil end
  return string.sub(value, 1, sep - 1), string.sub(value, sep + 1)
end
"""

_CLAIM = (
    _HOLDER
    + """
local now = now_ms()
local who, n = ARGV[1], tonumber(ARGV[3])
local value = who .. '\t' .. string.format('%d', now + tonumber(ARGV[2]))
local out = {}
for i = 4, #ARGV do
  if #out >= n then break end
  local eid = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], eid) and redis.call('HGET', KEYS[3], eid) ~= who then
    local h = holder(redis.call('HGET', KEYS[2], eid), now)
    if h == nil or h == who then
      redis.call('HSET', KEYS[2], eid, value)
      out[#out + 1] = eid
    end
  end
end
return out
"""
)

_RELEASE = """
local n = 0
local prefix = ARGV[1] .. '\t'
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and string.sub(v, 1, #prefix) == prefix then n = n + redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return n
"""

# Compare-and-set on the version (the length of the event's audit list), then the same writes as ever.
_OVERRIDE = (
    _HOLDER
    + """
local eid, who = ARGV[2], ARGV[4]
local v = redis.call('LLEN', KEYS[3])
if v ~= tonumber(ARGV[3]) then return {'stale', tostring(v)} end
local h, expiry = holder(redis.call('HGET', KEYS[6], eid), now_ms())
if h and h ~= who then return {'claimed', h, expiry} end
local first = redis.call('HGET', KEYS[7], eid)
if first == who then return {'second', first} end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[8] ~= '' and redis.call('HSETNX', KEYS[9], ARGV[8], ARGV[9]) == 1 then
  redis.call('ZADD', KEYS[8], ARGV[10], ARGV[8])
end
local fields = {}
for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('RPUSH', KEYS[3], ARGV[7])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event_id', eid, 'decision', ARGV[1])
redis.call('HDEL', KEYS[6], eid)
if ARGV[6] == '1' and v == 0 and not first and redis.call('ZSCORE', KEYS[5], eid) then
  redis.call('HSET', KEYS[7], eid, who)
else
  redis.call('ZREM', KEYS[5], eid)
  redis.call('HDEL', KEYS[7], eid)
end
return {'ok'}
"""
)


@dataclass(frozen=True)
class Claim:
    moderator: str
    until: datetime


def _ms(value: object) -> datetime:
    return datetime.fromtimestamp(int(str(value)) / 1000, UTC)


class OverrideConflict(Exception):
    """An override the store refused; the caller shows why (a 409 on the page and the API)."""

    def __init__(self, event_id: str, message: str) -> None:
        super().__init__(message)
        self.event_id = event_id


class StaleDecision(OverrideConflict):
    """The decision changed since the version the moderator saw; ``last`` is the audit entry that did it."""

    def __init__(self, current: Decision, version: int, expected: int, last: dict[str, str] | None) -> None:
        who = f" by {last.get('moderator')}" if last else ""
        super().__init__(current.event_id, f"decision changed{who} (version {expected} -> {version})")
        self.current, self.version, self.expected, self.last = current, version, expected, last


class ClaimedByOther(OverrideConflict):
    def __init__(self, event_id: str, moderator: str, until: datetime) -> None:
        super().__init__(event_id, f"claimed by {moderator} until {until.isoformat()}")
        self.moderator, self.until = moderator, until


class SecondReviewPending(OverrideConflict):
    def __init__(self, event_id: str, first: str) -> None:
        super().__init__(event_id, f"{first} gave the first verdict; a second moderator must review it")
        self.first = first


class DecisionStore:
    def __init__(self, client: redis.Redis, namespace: str = "moderation") -> None:
        self.r: Any = client  # redis-py's stubs type stream replies too loosely to be useful
        self.keys = Keys(namespace)
        self._write_once = client.register_script(_WRITE_ONCE)
        self._override = client.register_script(_OVERRIDE)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

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
    def version_of(self, event_id: str) -> int:
        """A decision's version: how many overrides it has had (0: as the model decided it)."""
        return int(self.r.llen(self.keys.audit(event_id)))

    def versions(self, event_ids: list[str]) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for e in event_ids:
            pipe.llen(self.keys.audit(e))
        return dict(zip(event_ids, (int(n) for n in pipe.execute()), strict=True))

    def get_versioned(self, event_id: str) -> tuple[Decision | None, int]:
        """The decision and its version, read together (one MULTI), for a form to send back."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.keys.decision(event_id))
        pipe.llen(self.keys.audit(event_id))
        raw, version = pipe.execute()
        return (None if raw is None else Decision.from_json(raw)), int(version)

    def override(
        self,
        event_id: str,
        verdict: Verdict,
        moderator: str,
        note: str = "",
        *,
        expected_version: int | None = None,
        second_review: bool = False,
    ) -> Decision:
        """Replace a decision's verdict, audit it, publish it and take the item off the review queue.

        A compare-and-set on the decision's version, in one Lua script: with ``expected_version`` (what the
        moderator's page showed) a decision that changed since is refused with :class:`StaleDecision`;
        without it the override applies to the version read here, so a concurrent override is never lost
        silently either. An item another moderator holds a live claim on is refused
        (:class:`ClaimedByOther`). With ``second_review``, a first moderator's ``block`` of a queued item
        keeps it queued for a different moderator (:class:`SecondReviewPending` for the same one).
        """
        from worker.delivery.webhook import WebhookQueue

        hooks = WebhookQueue(self.r, self.keys.ns)
        callback = hooks.callback_of(event_id)
        current: Decision | None = None
        expected = 0
        for _ in range(3 if expected_version is None else 1):
            current, version = self.get_versioned(event_id)
            if current is None:
                raise KeyError(event_id)
            expected = version if expected_version is None else expected_version
            if version != expected:
                raise StaleDecision(current, version, expected, self._last_audit(event_id))
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
                "version": str(expected + 1),
            }
            keys = [
                self.keys.decision(event_id),
                self.keys.overrides,
                self.keys.audit(event_id),
                self.keys.decisions,
                self.keys.review,
                self.keys.claims,
                self.keys.second,
                hooks.keys.due,
                hooks.keys.jobs,
            ]
            # The final verdict reaches the event's callback too, scheduled by the same script: an override
            # never misses its callback.
            job = ("", "", 0.0) if callback is None else (*hooks.job(callback, updated), time.time())
            wait = "1" if second_review and verdict == Verdict.BLOCK else "0"
            flat = [x for kv in audit.items() for x in kv]
            args: list[str | int | float] = [
                updated.to_json(),
                event_id,
                expected,
                moderator,
                STREAM_MAXLEN,
                wait,
                json.dumps(audit),
                *job,
            ]
            status, *rest = self._override(keys=keys, args=[*args, *flat])
            if status == "ok":
                return updated
            if status == "claimed":
                raise ClaimedByOther(event_id, str(rest[0]), _ms(rest[1]))
            if status == "second":
                raise SecondReviewPending(event_id, str(rest[0]))
            if expected_version is not None:
                fresh, now = self.get_versioned(event_id)
                raise StaleDecision(fresh or current, now, expected, self._last_audit(event_id))
        assert current is not None  # the loop ran at least once
        raise StaleDecision(current, self.version_of(event_id), expected, self._last_audit(event_id))

    def _last_audit(self, event_id: str) -> dict[str, str] | None:
        raw = self.r.lindex(self.keys.audit(event_id), -1)
        return None if raw is None else dict(json.loads(raw))

    # --- claims: who is reviewing which queued item -------------------------------------------------
    def claim(self, event_ids: Iterable[str], moderator: str, n: int, lease_s: float) -> list[str]:
        """Claim up to ``n`` of ``event_ids`` (in that order) for ``moderator`` for ``lease_s`` seconds.

        Atomic (one Lua script): an id is taken only if it is still queued, not held by another moderator's
        live lease and not waiting for this moderator's own second review; ids this moderator already holds
        are renewed and count towards ``n``. Returns the ids now held, in order.
        """
        ids = list(event_ids)
        if not ids or n <= 0:
            return []
        keys = [self.keys.review, self.keys.claims, self.keys.second]
        got = self._claim(keys=keys, args=[moderator, max(1, int(lease_s * 1000)), n, *ids])
        return [str(e) for e in got]

    def release(self, event_ids: Iterable[str], moderator: str) -> int:
        """Give back this moderator's claims on ``event_ids`` (a skip); others' claims stay."""
        ids = list(event_ids)
        if not ids:
            return 0
        return int(self._release(keys=[self.keys.claims], args=[moderator, *ids]))

    def claims(self) -> dict[str, Claim]:
        """Live claims (expired leases are left out: their items are back in the queue)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(self.keys.claims)
        (sec, usec), raw = pipe.execute()
        now = int(sec) * 1000 + int(usec) // 1000
        out = {}
        for event_id, value in raw.items():
            who, _, until = str(value).partition("\t")
            if until.isdigit() and int(until) > now:
                out[str(event_id)] = Claim(who, _ms(until))
        return out

    def claim_of(self, event_id: str) -> Claim | None:
        return self.claims().get(event_id)

    def second_reviews(self) -> dict[str, str]:
        """Blocked items waiting for a second moderator: event_id -> the first moderator."""
        return {str(k): str(v) for k, v in self.r.hgetall(self.keys.second).items()}

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

    def recent_decisions(self, count: int = 500, before: str = "+") -> list[tuple[str, str, str]]:
        """(stream id, event_id, decision JSON) from the decisions stream, newest first; ``before`` is an
        exclusive stream id for paging (overrides appear too, as later entries of the same event)."""
        if before == "0-0":
            return []
        end = before if before == "+" else f"({before}"
        rows = self.r.xrevrange(self.keys.decisions, end, "-", count=count)
        return [(str(i), str(f.get("event_id", "")), str(f.get("decision", ""))) for i, f in rows]

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
