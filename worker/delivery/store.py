"""Where decisions go: the decision records, the decisions stream and the review queue (keys: worker/keys.py).

The worker's write of a batch is one Lua script: per decision, ``SET NX`` of the record (a redelivered event
cannot decide twice), the item pointer, one entry on the decisions stream, the review-queue entry, and the
``XACK`` + ``XDEL`` of the event's stream entry. Atomic, so no crash can leave a decision without its stream
entry or an acked event without its decision; one round trip per batch. Records carry a TTL
(``record_ttl_s``): the archiver's Parquet files, not Redis, are the durable record.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
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

# KEYS: record, audit list, overrides stream, decisions stream, review zset.
# ARGV: new decision json, audit json (fields as a JSON object), event_id, decisions MAXLEN, ttl (0: keep the
# record's remaining lifetime). The audit list lives as long as its record.
_OVERRIDE = """
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
end
local fields = cjson.decode(ARGV[2])
local flat = {}
for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = v end
redis.call('XADD', KEYS[3], '*', unpack(flat))
redis.call('RPUSH', KEYS[2], ARGV[2])
local left = redis.call('PTTL', KEYS[1])
if left > 0 then redis.call('PEXPIRE', KEYS[2], left) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'event_id', ARGV[3], 'decision', ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[3])
return 1
"""


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

    @classmethod
    def from_url(cls, url: str, namespace: str = "moderation", **options: Any) -> DecisionStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), namespace, **options)

    # --- writes by the worker ---------------------------------------------------------------------
    def write(self, decision: Decision, ack: Ack | None = None) -> bool:
        """Record a decision once; returns False if this event was already decided (a redelivery)."""
        return self.write_many([decision], [ack])[0]

    def write_many(
        self, decisions: Sequence[Decision], acks: Sequence[Ack | None] | None = None
    ) -> list[bool]:
        """Write a batch in one atomic script; each decision's stream entry (if any) is acked and deleted."""
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
        keys = [
            self.keys.decision(event_id),
            self.keys.audit(event_id),
            self.keys.overrides,
            self.keys.decisions,
            self.keys.review,
        ]
        argv: list[str | int] = [
            updated.to_json(),
            json.dumps(audit),
            event_id,
            self.decisions_maxlen,
            self.ttl_s or 0,
        ]
        self._override(keys=keys, args=argv)
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
