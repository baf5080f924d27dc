"""Where decisions go: the decision records, the decisions stream and the review queue (keys: worker/keys.py).

The worker's write of a batch is one Lua script: per decision, ``SET NX`` of the record (a redelivered event
cannot decide twice), the item pointer, one entry on the decisions stream, the review-queue entry, and the
``XACK`` + ``XDEL`` of the event's stream entry. Atomic, so no crash can leave a decision without its stream
entry or an acked event without its decision; one round trip per batch. Records carry a TTL
(``record_ttl_s``): the archiver's Parquet files, not Redis, are the durable record.

Moderators' side: claims with leases on queued items and versioned overrides, each one Lua script (an
override is refused when the decision changed since the version the moderator saw, and schedules the
event's callback with the final verdict in the same script).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from worker.keys import Keys
from worker.records import Decision, Verdict, utcnow

STREAM_MAXLEN = 1_000_000

Ack = tuple[str, str]
"""(stream key, entry id) of the stream entry a decision settles."""

# KEYS: decisions stream, review zset, then per decision: record, item pointer, source stream.
# ARGV: ttl (0: none), decisions stream MAXLEN, group, then per decision: json, event_id, review?, score,
# entry id ('' when nothing is to be acked). Returns 1 per decision written, 0 per duplicate.
_WRITE_BATCH = """
local ttl = tonumber(ARGV[1])
local out = {}
local n = (#KEYS - 2) / 3
for i = 0, n - 1 do
  local rec, item, src = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local a = 4 + 5 * i
  local body, eid, entry = ARGV[a], ARGV[a + 1], ARGV[a + 4]
  local ok
  if ttl > 0 then
    ok = redis.call('SET', rec, body, 'NX', 'EX', ttl)
  else
    ok = redis.call('SET', rec, body, 'NX')
  end
  if ok then
    if ttl > 0 then redis.call('SET', item, eid, 'EX', ttl) else redis.call('SET', item, eid) end
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event_id', eid, 'decision', body)
    if ARGV[a + 2] == '1' then redis.call('ZADD', KEYS[2], ARGV[a + 3], eid) end
    out[i + 1] = 1
  else
    out[i + 1] = 0
  end
  if entry ~= '' then
    redis.call('XACK', src, ARGV[3], entry)
    redis.call('XDEL', src, entry)
  end
end
return out
"""

# KEYS: dead-letter stream, source stream. ARGV: group, entry id ('' none), then field/value pairs.
_DEAD_LETTER = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
return id
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
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
if ARGV[8] ~= '' and redis.call('HSETNX', KEYS[9], ARGV[8], ARGV[9]) == 1 then
  redis.call('ZADD', KEYS[8], ARGV[10], ARGV[8])
end
local fields = {}
for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('RPUSH', KEYS[3], ARGV[7])
local left = redis.call('PTTL', KEYS[1])
if left > 0 then redis.call('PEXPIRE', KEYS[3], left) end  -- the audit list lives as long as its record
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


def raw_fields(raw: str | bytes | None) -> dict[str, str]:
    """A message body as dead-letter fields, whole: UTF-8 text as is, anything else base64."""
    if raw is None:
        return {"raw": ""}
    if isinstance(raw, str):
        return {"raw": raw}
    try:
        return {"raw": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw": base64.b64encode(raw).decode("ascii"), "raw_encoding": "base64"}


class DecisionStore:
    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "moderation",
        *,
        ttl_s: int | None = None,
        decisions_maxlen: int = STREAM_MAXLEN,
    ) -> None:
        self.r: Any = client  # redis-py's stubs type stream replies too loosely to be useful
        self.keys = Keys(namespace)
        self.ttl_s = ttl_s
        self.decisions_maxlen = decisions_maxlen
        self._write_batch = client.register_script(_WRITE_BATCH)
        self._dead_letter = client.register_script(_DEAD_LETTER)
        self._override = client.register_script(_OVERRIDE)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, namespace: str = "moderation", **options: Any) -> DecisionStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), namespace, **options)

    # --- writes by the worker ---------------------------------------------------------------------
    def write(self, decision: Decision, ack: Ack | None = None) -> bool:
        """Record a decision once; returns False if this event was already decided (a redelivery)."""
        return self.write_many([decision], [ack])[0]

    def write_many(
        self, decisions: Iterable[Decision], acks: Sequence[Ack | None] | None = None
    ) -> list[bool]:
        """Write a batch in one atomic script; each decision's stream entry (if any) is acked and deleted."""
        decisions = list(decisions)
        if not decisions:
            return []
        acks = list(acks) if acks is not None else [None] * len(decisions)
        keys = [self.keys.decisions, self.keys.review]
        argv: list[str | bytes | float | int] = [self.ttl_s or 0, self.decisions_maxlen, self.keys.group]
        for d, ack in zip(decisions, acks, strict=True):
            keys += [self.keys.decision(d.event_id), self.keys.item(d.item_id), ack[0] if ack else keys[0]]
            review = "1" if d.verdict == Verdict.REVIEW else "0"
            argv += [d.to_json(), d.event_id, review, d.ai_score or 0.0, ack[1] if ack else ""]
        return [bool(x) for x in self._write_batch(keys=keys, args=argv)]

    def dead_letter(
        self, reason: str, detail: str, raw: str | bytes | None = None, ack: Ack | None = None, **fields: str
    ) -> str:
        """Append the whole message and why to the dead-letter stream (and ack its entry, atomically)."""
        entry: dict[str, str] = {"reason": reason, "detail": detail[:4000], **raw_fields(raw)}
        entry["at"] = utcnow().isoformat()
        entry.update({k: str(v) for k, v in fields.items()})
        if ack:
            entry.setdefault("stream", ack[0])
            entry.setdefault("entry_id", ack[1])
        flat = [x for kv in entry.items() for x in kv]
        keys = [self.keys.deadletter, ack[0] if ack else self.keys.deadletter]
        result = self._dead_letter(keys=keys, args=[self.keys.group, ack[1] if ack else "", *flat])
        return result.decode() if isinstance(result, bytes) else str(result)

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

        hooks = WebhookQueue(self.r, self.keys.namespace)
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
                self.decisions_maxlen,
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
