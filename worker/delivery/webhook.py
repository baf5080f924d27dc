"""Durable, signed callbacks: each decision (and each moderator's final verdict) POSTed to the event's
``callback_url``, retried with backoff over hours from a schedule kept in Redis, then dead-lettered.

Why durable: a receiver that is down for an hour must still learn the verdict, and a worker that stops must
not take its pending callbacks with it. ``Webhooks.send`` only writes a job; a :class:`Dispatcher` (a thread
in each worker, or ``moderation webhooks run``) delivers due jobs. Keys (``ns`` = settings.namespace)::

    {ns}:webhooks:due              sorted set: job id by due time (a claimed job is pushed a lease ahead)
    {ns}:webhooks:jobs             hash: job id -> job JSON (url, body, attempts so far, last error)
    {ns}:webhooks:dead             stream: deliveries given up, with the reason and the whole job
    {ns}:webhooks:callback:{eid}   the event's callback URL, so a later override reaches it too
    {ns}:webhooks:outcomes         hash: outcome -> count, fleet-wide (served by the API's /metrics)

Signed with Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id`` (the job id, the same on
every retry, so receivers can drop duplicates), ``webhook-timestamp`` and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``). Without a valid ``whsec_`` secret nothing is sent: the
job is dead-lettered with reason ``no_secret`` (replay it once a secret is set).

The body is the Standard Webhooks envelope ``{"type", "timestamp", "data"}`` with ``type`` ``decision.made``
(the model) or ``decision.overridden`` (a moderator; ``data.source`` is ``moderator:<name>``) and ``data`` the
decision.

URL policy (checked when a job is delivered, so a changed allow-list applies to queued jobs too): the host
must be on ``callback_allow_hosts`` (ports included), https unless ``callback_allow_http``, no credentials in
the URL; redirects are never followed and each attempt has a short connect and read timeout.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import structlog
from prometheus_client import CollectorRegistry, Counter
from standardwebhooks import Webhook

from worker.keys import Keys
from worker.records import Decision, utcnow
from worker.settings import Settings

log = structlog.get_logger(__name__)

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
CALLBACK_TTL_S = 90 * 86400  # an override may come weeks after the model's decision
DEAD_MAXLEN = 100_000
OUTCOMES = ("delivered", "retried", "dead", "refused")
SECRET_HELP = (
    "set MODERATION_WEBHOOK_SECRET to a Standard Webhooks secret (`moderation webhooks secret` prints a new "
    "one) and give the same secret to the receiver"
)


class WebhookKeys:
    """The schedule's keys (named in worker/keys.py, in the namespace's hash slot)."""

    def __init__(self, namespace: str) -> None:
        self._keys = Keys(namespace)
        self.due = self._keys.webhooks_due
        self.jobs = self._keys.webhooks_jobs
        self.dead = self._keys.webhooks_dead
        self.outcomes = self._keys.webhooks_outcomes

    def callback(self, event_id: str) -> str:
        return self._keys.webhook_callback(event_id)


# --- URL policy ---------------------------------------------------------------------------------------
def _host_port(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def _split_entry(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``*.example.com``, ``[::1]:8443`` -> (host pattern, port or None)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return entry, None


def callback_refusal(settings: Settings, url: str) -> str | None:
    """Why ``url`` may not receive callbacks under this policy, or None when it may."""
    try:
        parts = urlsplit(url)
        scheme, host, port = _host_port(url)
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    allowed_schemes = ("https", "http") if settings.callback_allow_http else ("https",)
    if scheme not in allowed_schemes:
        return f"scheme {scheme or '(none)'!r} not allowed (https only unless callback_allow_http is set)"
    if parts.username is not None or parts.password is not None:
        return "credentials in the URL are not allowed"
    if not host:
        return "no host"
    default = 443 if scheme == "https" else 80
    effective = port if port is not None else default
    for entry in settings.callback_allow_hosts:
        pattern, want = _split_entry(entry)
        if fnmatchcase(host, pattern) and effective == (want if want is not None else default):
            return None
    return f"host {host}:{effective} is not on callback_allow_hosts"


# --- payload and signature ----------------------------------------------------------------------------
def envelope(decision: Decision, kind: str | None = None) -> str:
    """The Standard Webhooks body for a decision (deterministic, so a repeated send is one job)."""
    kind = kind or ("decision.overridden" if decision.source.startswith("moderator:") else "decision.made")
    data = json.loads(decision.to_json())
    return json.dumps(
        {"type": kind, "timestamp": decision.decided_at.isoformat(), "data": data}, separators=(",", ":")
    )


def job_id(url: str, body: str) -> str:
    return "msg_" + hashlib.sha256(f"{url}\n{body}".encode()).hexdigest()[:32]


def signer(settings: Settings) -> Webhook | None:
    """The signer for the configured secret, or None when it is missing or not a valid secret."""
    secret = settings.webhook_secret
    if not secret:
        return None
    try:
        wh = Webhook(secret)
    except Exception:
        return None
    return wh if len(wh._whsecret) >= 16 else None


def signed_headers(wh: Webhook, msg_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    now = now or datetime.now(UTC)
    return {
        "content-type": "application/json",
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(int(now.timestamp())),
        SIGNATURE_HEADER: wh.sign(msg_id, now, body),
    }


# --- the schedule -------------------------------------------------------------------------------------
_ENQUEUE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local job = redis.call('HGET', KEYS[2], id)
  if job then
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    table.insert(out, id)
    table.insert(out, job)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""


def outcome_counter(registry: CollectorRegistry) -> Counter:
    """This process's delivery attempts by outcome, every outcome present from the start (0 until it
    happens, so a rate() sees the first one)."""
    counter = Counter(
        "moderation_webhook_deliveries",
        "Webhook delivery attempts, by outcome (delivered, retried, dead, refused).",
        ["outcome"],
        registry=registry,
    )
    for outcome in OUTCOMES:
        counter.labels(outcome)
    return counter


class WebhookQueue:
    """The Redis-backed schedule: enqueue once per (url, body), claim due jobs with a lease, settle them."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.r: Any = client
        self.keys = WebhookKeys(namespace)
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)

    def job(self, url: str, decision: Decision) -> tuple[str, str]:
        """The job id (one per url and body) and the job record a delivery is scheduled with."""
        body = envelope(decision)
        jid = job_id(url, body)
        job = {
            "id": jid,
            "url": url,
            "event_id": decision.event_id,
            "body": body,
            "attempts": 0,
            "created_at": utcnow().isoformat(),
            "last_error": "",
        }
        return jid, json.dumps(job)

    def enqueue(self, url: str, decision: Decision, remember: bool = True, pipe: Any = None) -> str:
        """Schedule a delivery (once per url and body); inside ``pipe`` when given, else on its own."""
        jid, job = self.job(url, decision)
        own = pipe is None
        pipe = self.r.pipeline(transaction=True) if own else pipe
        if remember:
            pipe.set(self.keys.callback(decision.event_id), url, ex=CALLBACK_TTL_S)
        self._enqueue(keys=[self.keys.due, self.keys.jobs], args=[jid, job, time.time()], client=pipe)
        if own:
            pipe.execute()
        return jid

    def callback_of(self, event_id: str) -> str | None:
        """The callback URL the event asked for (recorded when its first decision was sent)."""
        url = self.r.get(self.keys.callback(event_id))
        return None if url is None else str(url)

    def claim(self, count: int, lease_s: float, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        flat = self._claim(keys=[self.keys.due, self.keys.jobs], args=[now, count, now + lease_s])
        return [json.loads(flat[i + 1]) for i in range(0, len(flat), 2)]

    def delivered(self, job: dict[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(self.keys.due, job["id"])
        pipe.hdel(self.keys.jobs, job["id"])
        pipe.hincrby(self.keys.outcomes, "delivered", 1)
        pipe.execute()

    def retry(self, job: dict[str, Any], due: float) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.jobs, job["id"], json.dumps(job))
        pipe.zadd(self.keys.due, {job["id"]: due})
        pipe.hincrby(self.keys.outcomes, "retried", 1)
        pipe.execute()

    def release(self, job: dict[str, Any]) -> None:
        """Hand a claimed, unattempted job back (a dispatcher that stops)."""
        self.r.zadd(self.keys.due, {job["id"]: time.time()}, xx=True)

    def dead(self, job: dict[str, Any], reason: str, outcome: str = "dead") -> None:
        entry = {
            "reason": reason,
            "detail": str(job.get("last_error", ""))[:2000],
            "url": job["url"],
            "event_id": job.get("event_id", ""),
            "webhook_id": job["id"],
            "attempts": str(job.get("attempts", 0)),
            "job": json.dumps(job),
            "at": utcnow().isoformat(),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.keys.dead, entry, maxlen=DEAD_MAXLEN, approximate=True)
        pipe.zrem(self.keys.due, job["id"])
        pipe.hdel(self.keys.jobs, job["id"])
        pipe.hincrby(self.keys.outcomes, outcome, 1)
        pipe.execute()

    def dead_letters(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        return [(str(i), dict(f)) for i, f in self.r.xrange(self.keys.dead, count=count)]

    def replay_dead(self, entry_ids: list[str] | None = None) -> int:
        """Schedule dead-lettered deliveries again (all, or these entries) from their first attempt."""
        n = 0
        for entry_id, fields in self.dead_letters(count=DEAD_MAXLEN):
            if entry_ids is not None and entry_id not in entry_ids:
                continue
            job = json.loads(fields["job"])
            job.update(attempts=0, last_error="")
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self.keys.jobs, job["id"], json.dumps(job))
            pipe.zadd(self.keys.due, {job["id"]: time.time()})
            pipe.xdel(self.keys.dead, entry_id)
            pipe.execute()
            n += 1
        return n

    def waiting(self) -> int:
        return int(self.r.zcard(self.keys.due))

    def outcomes(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.keys.outcomes).items()}


# --- delivery -----------------------------------------------------------------------------------------
class Dispatcher:
    """Delivers due jobs from a few threads until :meth:`stop`; safe to run in many processes at once."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        threads: int = 4,
        poll_s: float = 0.5,
    ) -> None:
        redis_url = settings.require_redis("callbacks are scheduled in Redis")
        self.settings = settings
        self.queue = WebhookQueue(redis.Redis.from_url(redis_url, decode_responses=True), settings.namespace)
        self.signer = signer(settings)
        self.schedule = [float(s) for s in settings.webhook_retry_schedule_s]
        timeout = httpx.Timeout(settings.webhook_timeout_s, connect=settings.webhook_connect_timeout_s)
        self.lease_s = settings.webhook_connect_timeout_s + settings.webhook_timeout_s * 2 + 30
        self.client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)
        self.outcomes = outcome_counter(registry if registry is not None else CollectorRegistry())
        self.poll_s = poll_s
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"webhook-{i}", daemon=True)
            for i in range(max(1, threads))
        ]

    def start(self) -> Dispatcher:
        if self.signer is None:
            log.warning(
                "webhook_secret_missing", detail=f"callbacks would be dead-lettered unsent; {SECRET_HELP}"
            )
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop taking jobs. An attempt in flight is bounded by the timeouts; one cut short by process exit
        is retried by any dispatcher after its lease, so this never holds up a worker's drain for long."""
        self._stop.set()
        self.wake.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.stop()
        if not any(t.is_alive() for t in self._threads):
            self.client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once(1)
            except Exception:
                log.warning("webhook_dispatch_failed", exc_info=True)
                busy = 0
            if not busy:
                self.wake.wait(self.poll_s)
                self.wake.clear()

    def run_once(self, count: int = 16) -> int:
        """Claim and attempt up to ``count`` due jobs; returns how many were attempted."""
        jobs = self.queue.claim(count, self.lease_s)
        for i, job in enumerate(jobs):
            if self._stop.is_set():
                for rest in jobs[i:]:
                    self.queue.release(rest)
                return i
            self.attempt(job)
        return len(jobs)

    def attempt(self, job: dict[str, Any]) -> str:
        url = job["url"]
        if self.signer is None:
            job["last_error"] = f"no valid webhook secret: {SECRET_HELP}"
            log.error("webhook_unsigned_refused", url=url, event_id=job.get("event_id"), detail=SECRET_HELP)
            return self._count("refused", lambda: self.queue.dead(job, "no_secret", "refused"))
        refusal = callback_refusal(self.settings, url)
        if refusal is not None:
            job["last_error"] = refusal
            log.warning("webhook_refused", url=url, event_id=job.get("event_id"), why=refusal)
            return self._count("refused", lambda: self.queue.dead(job, "callback_refused", "refused"))
        job["attempts"] = int(job.get("attempts", 0)) + 1
        headers = signed_headers(self.signer, job["id"], job["body"])
        try:
            with self.client.stream("POST", url, content=job["body"].encode(), headers=headers) as resp:
                status = resp.status_code
            why = f"HTTP {status}"
        except httpx.HTTPError as exc:
            status, why = 0, f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= status < 300:
            log.info("webhook_delivered", url=url, event_id=job.get("event_id"), attempts=job["attempts"])
            return self._count("delivered", lambda: self.queue.delivered(job))
        job["last_error"] = why
        if status == 410:  # the receiver says this endpoint is gone for good
            return self._count("dead", lambda: self.queue.dead(job, "gone"))
        if job["attempts"] > len(self.schedule):
            log.error(
                "webhook_dead", url=url, event_id=job.get("event_id"), attempts=job["attempts"], why=why
            )
            return self._count("dead", lambda: self.queue.dead(job, "retries_exhausted"))
        delay = self.schedule[job["attempts"] - 1]
        log.warning(
            "webhook_failed", url=url, event_id=job.get("event_id"), attempts=job["attempts"], why=why
        )
        return self._count("retried", lambda: self.queue.retry(job, time.time() + delay))

    def _count(self, outcome: str, settle: Any) -> str:
        settle()
        self.outcomes.labels(outcome).inc()
        return outcome


class Webhooks:
    """What the worker calls after a decision is stored: ``send`` writes a durable job and returns at once.

    With ``webhook_dispatch_in_worker`` (the default) it also runs a :class:`Dispatcher` in this process,
    stopped by :meth:`close` without waiting for slow receivers.
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        redis_url = settings.require_redis("callbacks are scheduled in Redis")
        self.settings = settings
        self.queue = WebhookQueue(redis.Redis.from_url(redis_url, decode_responses=True), settings.namespace)
        self.dispatcher: Dispatcher | None = None
        if settings.webhook_dispatch_in_worker:  # also delivers overrides and jobs other processes left
            self.dispatcher = Dispatcher(settings, registry, threads=2).start()

    def send(self, url: str, decision: Decision) -> str:
        """Schedule ``decision`` for ``url``; returns the webhook id (the same for a repeated send)."""
        jid = self.queue.enqueue(url, decision)
        if self.dispatcher is not None:
            self.dispatcher.wake.set()
        return jid

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
