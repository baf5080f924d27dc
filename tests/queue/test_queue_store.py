"""The worker's write path on a real Redis: one script per batch writes, acks and deletes; records expire."""

from __future__ import annotations

import redis

from worker.delivery.store import DecisionStore
from worker.ingress.consumer import ensure_groups
from worker.records import Decision, Verdict


def decision(event_id: str, verdict: Verdict = Verdict.REVIEW, item: str = "item") -> Decision:
    return Decision(item_id=item, event_id=event_id, image_uri="s3://b/x.jpg", verdict=verdict, ai_score=0.7)


def test_a_batch_write_acks_and_deletes_its_entries_and_a_redelivery_writes_nothing(redis_url: str) -> None:
    store = DecisionStore.from_url(redis_url, "t")
    client = store.r
    ensure_groups(client, store.keys)
    ids = [client.xadd(store.keys.events, {"event": "{}"}) for _ in range(3)]
    client.xreadgroup(store.keys.group, "c1", {store.keys.events: ">"})
    assert client.xpending(store.keys.events, store.keys.group)["pending"] == 3
    acks = [(store.keys.events, i) for i in ids]
    written = store.write_many([decision("a"), decision("b"), decision("a")], acks)
    assert written == [True, True, False]  # the same event twice in one batch: one decision
    assert client.xpending(store.keys.events, store.keys.group)["pending"] == 0
    assert client.xlen(store.keys.events) == 0  # acked entries are deleted: the stream stays short
    assert client.xlen(store.keys.decisions) == 2
    assert sorted(store.review_queue()) == [("a", 0.7), ("b", 0.7)]


def test_decision_item_and_audit_records_carry_the_ttl(redis_url: str) -> None:
    store = DecisionStore.from_url(redis_url, "t", ttl_s=60)
    store.write(decision("e", item="i"))
    assert 0 < store.r.ttl(store.keys.decision("e")) <= 60
    assert 0 < store.r.ttl(store.keys.item("i")) <= 60
    store.override("e", Verdict.ALLOW, "alice")
    assert 0 < store.r.ttl(store.keys.decision("e")) <= 60
    assert 0 < store.r.ttl(store.keys.audit("e")) <= 60
    # a page or a trainer that opens the store without a TTL keeps the record's remaining lifetime
    plain = DecisionStore(store.r, "t")
    plain.override("e", Verdict.BLOCK, "bob")
    assert 0 < store.r.ttl(store.keys.decision("e")) <= 60
    assert 0 < store.r.ttl(store.keys.audit("e")) <= 60
    assert len(store.audit_of("e")) == 2


def test_without_a_ttl_records_do_not_expire(redis_url: str) -> None:
    store = DecisionStore.from_url(redis_url, "t")
    store.write(decision("e"))
    assert store.r.ttl(store.keys.decision("e")) == -1


def test_memory_per_decision_is_measurable(redis_url: str) -> None:
    """The figure docs/queue.md sizes Redis with: MEMORY USAGE of one record plus its item pointer."""
    store = DecisionStore.from_url(redis_url, "t", ttl_s=3600)
    store.write(decision("e"))
    client = redis.Redis.from_url(redis_url)
    record = client.memory_usage(store.keys.decision("e"))
    pointer = client.memory_usage(store.keys.item("item"))
    assert record is not None and pointer is not None and record > pointer > 0
