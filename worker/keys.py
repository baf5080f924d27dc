"""Every Redis key, stream, consumer group and Celery queue name the product uses, in one place.

All keys live under a hash-tagged namespace ``{ns}`` (``{moderation}:events``): Redis Cluster hashes only
the part between the braces, so every key of one deployment sits in one slot and the multi-key Lua scripts
(decision write + ack, dead letter + ack, bounded submit) run unchanged on a cluster. One namespace is then
one slot: deployments that outgrow one Redis primary run several namespaces (one per shard of producers).

Layout (``{ns}`` = ``{`` + ``settings.namespace`` + ``}``)::

    {ns}:events                stream: events to decide; field ``event`` holds the event JSON
    {ns}:urgent                stream: same contract, always read first
    {ns}:decision:{event_id}   JSON Decision; SET NX (same event twice, one decision), TTL record_ttl_s
    {ns}:item:{item_id}        event_id of the item's latest decision, TTL record_ttl_s
    {ns}:audit:{event_id}      list: one event's override audit entries, TTL record_ttl_s
    {ns}:decisions             stream: one entry per decision or override (archiver, upload pipeline)
    {ns}:review                sorted set: event_ids awaiting a moderator, by ai_score
    {ns}:claims                hash: event_id -> "moderator<TAB>lease end (Redis ms)" of claimed queue items
    {ns}:second                hash: event_id -> first moderator, for blocked items awaiting a second review
    {ns}:pdq                   stream: perceptual hashes of decided items (near-duplicate reuse), bounded
    {ns}:overrides             stream: append-only audit log of moderator actions
    {ns}:teacher               stream: teacher scores written by the teacher (``image_uri``, ``ai_score``,
                               optional ``source``, ``model``, ``group``), read by ``labels build``
    {ns}:deadletter            stream: entries that could not be decided, whole, with the reason
    {ns}:worker:{hostname}     hash: a live worker's heartbeat, with a TTL
    {ns}:webhooks:due          sorted set: callback job ids by due time (the durable retry schedule)
    {ns}:webhooks:jobs         hash: job id -> job JSON (url, body, attempts)
    {ns}:webhooks:dead         stream: callbacks that ran out of retries or were refused, with the reason
    {ns}:webhooks:outcomes     hash: fleet-wide delivery counts by outcome
    {ns}:webhooks:callback:{event_id}  the callback URL an event asked for (for its final verdict)
    {ns}:api:tokens            hash: sha256 of an API token -> its name and scopes
    {ns}:api:token-names       hash: token name -> sha256
    {ns}:model                 pub/sub channel: "current moved" or "shadow changed"; a hint, never the truth
    {ns}:shadow                string: the version to shadow, absent when shadow mode is off
    {ns}:shadow:{version}      hash: shadow comparison counts of one version (worker.lifecycle.shadow)
    {ns}:model:refused         hash: version -> JSON {reason, detail, worker, at} of the last refusal
    {ns}:review:session:{sid}  a review page session's moderator name, TTL the session's max age
    {ns}:review:login:client:{address}  hash: failed sign-ins from one client address (the throttle)
    {ns}:review:login:name:{digest}     hash: failed sign-ins for one account name (sha256 prefix)
    {ns}:training:{job_id}     hash: one training job's state (training.jobs)
    {ns}:training:jobs         sorted set: training job ids by submission time

Consumer groups: ``workers`` on the two event streams (every ``moderation worker``), ``archiver`` on the
decisions stream. Celery (the training queue, remote control) keeps its own list-based queues
``{namespace}.training``: those are Celery's broker, not part of the scripts above.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

WORKER_GROUP = "workers"
ARCHIVER_GROUP = "archiver"
EVENT_FIELD = "event"


@dataclass(frozen=True)
class Keys:
    namespace: str

    @cached_property
    def ns(self) -> str:
        """The hash-tagged prefix every key starts with."""
        return "{" + self.namespace + "}"

    @property
    def pattern(self) -> str:
        """``SCAN MATCH`` pattern of every key of this namespace."""
        return f"{self.ns}:*"

    # --- ingress ----------------------------------------------------------------------------------
    @property
    def events(self) -> str:
        return f"{self.ns}:events"

    @property
    def urgent(self) -> str:
        return f"{self.ns}:urgent"

    @property
    def streams(self) -> tuple[str, str]:
        """Event streams in reading order: urgent first."""
        return (self.urgent, self.events)

    group: str = WORKER_GROUP

    # --- decisions --------------------------------------------------------------------------------
    def decision(self, event_id: str) -> str:
        return f"{self.ns}:decision:{event_id}"

    def item(self, item_id: str) -> str:
        return f"{self.ns}:item:{item_id}"

    def audit(self, event_id: str) -> str:
        return f"{self.ns}:audit:{event_id}"

    @property
    def decisions(self) -> str:
        return f"{self.ns}:decisions"

    archiver_group: str = ARCHIVER_GROUP

    @property
    def review(self) -> str:
        return f"{self.ns}:review"

    @property
    def claims(self) -> str:
        return f"{self.ns}:claims"

    @property
    def second(self) -> str:
        return f"{self.ns}:second"

    @property
    def overrides(self) -> str:
        return f"{self.ns}:overrides"

    @property
    def teacher(self) -> str:
        return f"{self.ns}:teacher"

    @property
    def deadletter(self) -> str:
        return f"{self.ns}:deadletter"

    @property
    def pdq(self) -> str:
        return f"{self.ns}:pdq"

    # --- callbacks and the HTTP API --------------------------------------------------------------
    @property
    def webhooks_due(self) -> str:
        return f"{self.ns}:webhooks:due"

    @property
    def webhooks_jobs(self) -> str:
        return f"{self.ns}:webhooks:jobs"

    @property
    def webhooks_dead(self) -> str:
        return f"{self.ns}:webhooks:dead"

    @property
    def webhooks_outcomes(self) -> str:
        return f"{self.ns}:webhooks:outcomes"

    def webhook_callback(self, event_id: str) -> str:
        return f"{self.ns}:webhooks:callback:{event_id}"

    @property
    def api_tokens(self) -> str:
        return f"{self.ns}:api:tokens"

    @property
    def api_token_names(self) -> str:
        return f"{self.ns}:api:token-names"

    # --- models -----------------------------------------------------------------------------------
    @property
    def model_channel(self) -> str:
        return f"{self.ns}:model"

    @property
    def shadow(self) -> str:
        return f"{self.ns}:shadow"

    def shadow_stats(self, version: str) -> str:
        return f"{self.ns}:shadow:{version}"

    @property
    def model_refused(self) -> str:
        return f"{self.ns}:model:refused"

    # --- review page ------------------------------------------------------------------------------
    def review_session(self, sid: str) -> str:
        return f"{self.ns}:review:session:{sid}"

    def login_client(self, address: str) -> str:
        return f"{self.ns}:review:login:client:{address}"

    def login_name(self, digest: str) -> str:
        return f"{self.ns}:review:login:name:{digest}"

    # --- training jobs ----------------------------------------------------------------------------
    def training_job(self, job_id: str) -> str:
        return f"{self.ns}:training:{job_id}"

    @property
    def training_jobs(self) -> str:
        return f"{self.ns}:training:jobs"

    # --- workers ----------------------------------------------------------------------------------
    def worker(self, hostname: str) -> str:
        return f"{self.ns}:worker:{hostname}"

    @property
    def workers_pattern(self) -> str:
        return f"{self.ns}:worker:*"


@dataclass(frozen=True)
class Queues:
    """Celery queue names (lists in Celery's Redis transport, outside the hash-tagged scripts)."""

    ns: str

    @property
    def training(self) -> str:
        return f"{self.ns}.training"

    @property
    def control(self) -> str:
        """What ``moderation worker``'s Celery consumer listens on besides remote control (no task today)."""
        return f"{self.ns}.worker"
