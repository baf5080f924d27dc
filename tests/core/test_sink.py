"""The decision store's contract on a real Redis: one decision per event, stream and review queue in step."""

from __future__ import annotations

from worker.delivery.store import DecisionStore
from worker.records import Decision, Verdict


def decision(event_id: str, verdict: Verdict, score: float, item: str = "item") -> Decision:
    return Decision(item_id=item, event_id=event_id, image_uri="x.jpg", verdict=verdict, ai_score=score)


def test_write_is_idempotent_per_event(redis_url: str) -> None:
    store = DecisionStore.from_url(redis_url, "t")
    first = decision("e1", Verdict.REVIEW, 0.7)
    assert store.write(first) is True
    assert store.write(decision("e1", Verdict.ALLOW, 0.1)) is False
    assert store.get("e1") == first
    assert store.r.xlen(store.keys.decisions) == 1
    assert store.review_queue() == [("e1", 0.7)]


def test_review_queue_orders_by_score_and_skips_other_verdicts(redis_url: str) -> None:
    store = DecisionStore.from_url(redis_url, "t")
    results = store.write_many(
        [
            decision("a", Verdict.REVIEW, 0.6, "i1"),
            decision("b", Verdict.ALLOW, 0.1, "i2"),
            decision("c", Verdict.REVIEW, 0.8, "i3"),
            decision("d", Verdict.BLOCK, 0.95, "i4"),
            decision("a", Verdict.REVIEW, 0.6, "i1"),
        ]
    )
    assert results == [True, True, True, True, False]
    assert [e for e, _ in store.review_queue()] == ["c", "a"]
    assert store.get_item("i4") is not None and store.get_item("i4").verdict == Verdict.BLOCK  # type: ignore[union-attr]


def test_override_updates_audits_publishes_and_dequeues(redis_url: str) -> None:
    store = DecisionStore.from_url(redis_url, "t")
    store.write(decision("e", Verdict.REVIEW, 0.7))
    updated = store.override("e", Verdict.ALLOW, "alice", note="a photo")
    assert updated.verdict == Verdict.ALLOW and updated.source == "moderator:alice"
    assert store.get("e") == updated
    assert store.review_queue() == []
    [audit] = store.overrides()
    assert (
        audit["previous_verdict"] == "review"
        and audit["moderator"] == "alice"
        and audit["verdict"] == "allow"
    )
    assert store.r.xlen(store.keys.decisions) == 2


def test_dead_letter_keeps_the_raw_message_and_reason(redis_url: str) -> None:
    store = DecisionStore.from_url(redis_url, "t")
    store.dead_letter("malformed_event", "item_id: missing", raw=b"{not json")
    [(_, entry)] = store.dead_letters()
    assert entry["reason"] == "malformed_event" and entry["raw"] == "{not json"
