"""A team on one queue, on a real Redis: claims with leases, versioned overrides, second review, search.

The store's Lua scripts are what keeps two moderators apart, so they are hammered here from threads; the
pages and the API on a real server then answer 409 with what changed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from tests.review.conftest import TOKENS, Server
from tests.review.test_review_security import csrf_in, sign_in
from worker.delivery.store import (
    ClaimedByOther,
    DecisionStore,
    SecondReviewPending,
    StaleDecision,
)
from worker.records import Decision, Verdict
from worker.review import queue as review_queue
from worker.review.queue import QueueQuery

pytestmark = pytest.mark.integration


def queued(store: DecisionStore, n: int, source: str = "renders") -> list[str]:
    ids = [f"e{i:02d}" for i in range(n)]
    store.write_many(
        Decision(
            item_id=f"item-{e}",
            event_id=e,
            image_uri=f"file:///uploads/{source}/{e}.png",
            verdict=Verdict.REVIEW,
            ai_score=1.0 - i / 100,
        )
        for i, e in enumerate(ids)
    )
    return ids


@pytest.fixture
def store(redis_url: str) -> Iterator[DecisionStore]:
    yield DecisionStore.from_url(redis_url, "team")


def test_concurrent_claims_never_hand_one_item_to_two_moderators(store: DecisionStore) -> None:
    ids = queued(store, 40)
    held: dict[str, list[str]] = {}
    start = threading.Barrier(8)

    def claim(who: str) -> None:
        start.wait()
        got: list[str] = []
        for _ in range(3):  # each re-claims from the same stale snapshot: the script must refuse
            got += store.claim(ids, who, 5, lease_s=60)
        held[who] = sorted(set(got))

    threads = [threading.Thread(target=claim, args=(f"mod{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everyone = [e for got in held.values() for e in got]
    assert len(everyone) == len(set(everyone)) == 40  # 8 x 5, disjoint
    assert all(len(got) == 5 for got in held.values())
    claims = store.claims()
    assert {e: c.moderator for e, c in claims.items()} == {e: w for w, got in held.items() for e in got}


def test_the_queue_shows_unclaimed_and_own_claims_only(store: DecisionStore) -> None:
    ids = queued(store, 6)
    q = QueueQuery()
    mia = review_queue.claim_next(store, q, "mia", 2, 60)
    ada = review_queue.claim_next(store, q, "ada", 2, 60)
    assert mia == ids[:2] and ada == ids[2:4]  # each gets the next free ones in score order
    seen = [d.event_id for d in review_queue.page(store, q, "mia").items]
    assert seen == [*ids[:2], *ids[4:]]
    page = review_queue.page(store, q, "ada")
    assert [d.event_id for d in page.items] == ids[2:]
    assert set(page.mine) == set(ada) and page.held_by_others == 2 and page.total == 4
    assert review_queue.page(store, q).total == 6  # a tool listing without a viewer sees everything
    assert review_queue.claim_next(store, q, "mia", 2, 60) == mia  # topping up renews, takes nothing new
    # a skip gives an item back; releasing someone else's claim does nothing
    assert store.release([ada[0]], "mia") == 0 and store.release([ada[0]], "ada") == 1
    assert ada[0] in [d.event_id for d in review_queue.page(store, q, "mia").items]


def test_an_expired_lease_returns_the_item(store: DecisionStore) -> None:
    ids = queued(store, 2)
    assert store.claim(ids, "mia", 1, lease_s=0.2) == ids[:1]
    assert store.claim(ids[:1], "ada", 1, lease_s=60) == []
    deadline = time.monotonic() + 10
    while store.claim_of(ids[0]) is not None:  # wait for the lease to run out (Redis' clock)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ids[0] in [d.event_id for d in review_queue.page(store, QueueQuery(), "ada").items]
    assert store.claim(ids, "ada", 1, lease_s=60) == ids[:1]
    with pytest.raises(ClaimedByOther) as exc:
        store.override(ids[0], Verdict.BLOCK, "mia", expected_version=0)
    assert exc.value.moderator == "ada"


def test_a_stale_override_is_refused_and_names_what_changed(store: DecisionStore) -> None:
    [e] = queued(store, 1)
    assert store.get_versioned(e)[1] == 0
    store.override(e, Verdict.BLOCK, "mia", expected_version=0)
    with pytest.raises(StaleDecision) as exc:
        store.override(e, Verdict.ALLOW, "ada", expected_version=0)  # ada's page showed version 0
    stale = exc.value
    assert (stale.expected, stale.version, stale.current.verdict) == (0, 1, Verdict.BLOCK)
    assert stale.last is not None and stale.last["moderator"] == "mia" and stale.last["verdict"] == "block"
    assert [a["verdict"] for a in store.audit_of(e)] == ["block"]  # nothing written
    store.override(e, Verdict.ALLOW, "ada", expected_version=1)  # after looking again
    assert [(a["moderator"], a["version"]) for a in store.audit_of(e)] == [("mia", "1"), ("ada", "2")]
    assert [o["verdict"] for o in store.overrides()] == ["block", "allow"]


def test_concurrent_overrides_of_one_version_save_exactly_one(store: DecisionStore) -> None:
    [e] = queued(store, 1)
    outcomes: list[str] = []
    start = threading.Barrier(6)

    def act(i: int) -> None:
        start.wait()
        try:
            store.override(e, Verdict.BLOCK if i % 2 else Verdict.ALLOW, f"mod{i}", expected_version=0)
            outcomes.append("saved")
        except StaleDecision:
            outcomes.append("stale")

    threads = [threading.Thread(target=act, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["saved", *["stale"] * 5]
    assert len(store.audit_of(e)) == 1 and store.r.xlen(store.keys.overrides) == 1


def test_second_review_keeps_a_block_queued_for_another_moderator(store: DecisionStore) -> None:
    a, b = queued(store, 2)
    q = QueueQuery()
    store.override(a, Verdict.BLOCK, "mia", expected_version=0, second_review=True)
    store.override(b, Verdict.ALLOW, "mia", expected_version=0, second_review=True)  # allows do not wait
    assert store.in_review(a) and not store.in_review(b)
    assert store.get(a).verdict == Verdict.BLOCK  # type: ignore[union-attr]
    assert review_queue.page(store, q, "mia").total == 0  # not for the first moderator
    assert store.claim([a], "mia", 1, 60) == []
    with pytest.raises(SecondReviewPending):
        store.override(a, Verdict.BLOCK, "mia", expected_version=1, second_review=True)
    page = review_queue.page(store, q, "ada")
    assert [d.event_id for d in page.items] == [a] and page.second == {a: "mia"}
    store.override(a, Verdict.ALLOW, "ada", expected_version=1, second_review=True)
    assert not store.in_review(a) and store.second_reviews() == {}
    assert [x["moderator"] for x in store.audit_of(a)] == ["mia", "ada"]


def test_search_matches_item_id_and_uri_substrings(store: DecisionStore) -> None:
    ids = queued(store, 12)
    got = review_queue.page(store, QueueQuery(search="ITEM-E1"), "mia").items
    assert sorted(d.event_id for d in got) == [e for e in ids if e.startswith("e1")]
    assert review_queue.page(store, QueueQuery(search="/renders/e05."), "mia").total == 1
    assert review_queue.page(store, QueueQuery(search="photos"), "mia").total == 0
    # key=value terms match a field (or a metadata key); all terms must match
    assert review_queue.page(store, QueueQuery(search="item_id=e03"), "mia").total == 1
    assert review_queue.page(store, QueueQuery(search="verdict=review renders"), "mia").total == 12
    assert review_queue.page(store, QueueQuery(search="verdict=block"), "mia").total == 0
    assert review_queue.page(store, QueueQuery(search="uploader=bob"), "mia").total == 0
    raw = json.loads(store.r.get(store.keys.decision(ids[0])))  # a decision that carries its event's metadata
    store.r.set(store.keys.decision(ids[0]), json.dumps({**raw, "metadata": {"uploader": "Bob"}}))
    got = review_queue.page(store, QueueQuery(search="uploader=bob"), "mia").items
    assert [d.event_id for d in got] == [ids[0]]


# --- the page and the API on a real server --------------------------------------------------------------
def test_the_api_answers_409_with_what_changed(review_server: Server) -> None:
    store = review_server.store
    target = review_server.decided.review_items()[-1]
    h_mia = {"Authorization": f"Bearer {TOKENS['mia']}"}
    h_ada = {"Authorization": f"Bearer {TOKENS['ada']}"}
    with httpx.Client(base_url=review_server.url) as c:
        item = c.get(f"/api/items/{target.event_id}", headers=h_mia).json()
        version = item["version"]
        r = c.post(
            f"/api/items/{target.event_id}/override",
            json={"verdict": "block", "version": version},
            headers=h_ada,
        )
        assert r.status_code == 200 and r.json()["version"] == version + 1
        r = c.post(
            f"/api/items/{target.event_id}/override",
            json={"verdict": "allow", "version": version},
            headers=h_mia,
        )
        assert r.status_code == 409
        body = r.json()
        assert "ada confirmed it AI" in body["detail"] and body["version"] == version + 1
        assert body["changed_by"]["moderator"] == "ada" and body["decision"]["verdict"] == "block"
        assert store.get(target.event_id).verdict == Verdict.BLOCK  # type: ignore[union-attr]


def test_api_claims_hide_items_from_the_other_moderator(review_server: Server) -> None:
    h_mia = {"Authorization": f"Bearer {TOKENS['mia']}"}
    h_ada = {"Authorization": f"Bearer {TOKENS['ada']}"}
    with httpx.Client(base_url=review_server.url) as c:
        got = c.post("/api/claims", json={"n": 2}, headers=h_mia).json()["claimed"]
        ids = [g["event_id"] for g in got]
        assert len(ids) == 2 and all(g["until"] for g in got)
        listed = c.get("/api/queue", params={"limit": 500}, headers=h_ada).json()
        assert not set(ids) & {i["decision"]["event_id"] for i in listed["items"]}
        assert listed["held_by_others"] == 2
        r = c.post(f"/api/items/{ids[0]}/override", json={"verdict": "allow"}, headers=h_ada)
        assert r.status_code == 409 and "mia is reviewing this item" in r.json()["detail"]
        assert c.delete(f"/api/claims/{ids[0]}", headers=h_ada).json() == {"released": False}
        for e in ids:
            assert c.delete(f"/api/claims/{e}", headers=h_mia).json() == {"released": True}
        listed = c.get("/api/queue", params={"limit": 500}, headers=h_ada).json()
        assert set(ids) <= {i["decision"]["event_id"] for i in listed["items"]}


def test_a_skip_on_the_page_gives_the_item_back_before_its_redirect(review_server: Server) -> None:
    """The item page's Skip: by the time its 303 arrives, the item is free and on the other moderator's
    queue, and mia is sent on to an item she now holds (never the one she skipped)."""
    store = review_server.store
    h_ada = {"Authorization": f"Bearer {TOKENS['ada']}"}
    free = [d.event_id for d in review_server.decided.review_items() if store.claim_of(d.event_id) is None]
    target = free[0]
    mia = sign_in(review_server, "mia")
    try:
        token = csrf_in(mia.get(f"/items/{target}").text)  # opening it claims it
        assert store.claim_of(target).moderator == "mia"  # type: ignore[union-attr]
        with httpx.Client(base_url=review_server.url) as c:
            listed = c.get("/api/queue", params={"limit": 500}, headers=h_ada).json()
            assert target not in {i["decision"]["event_id"] for i in listed["items"]}
            r = mia.post(
                f"/items/{target}/action",
                data={"action": "skip", "csrf_token": token},
                headers={"Origin": review_server.url},
            )
            assert r.status_code == 303
            assert store.claim_of(target) is None
            listed = c.get("/api/queue", params={"limit": 500}, headers=h_ada).json()
            assert target in {i["decision"]["event_id"] for i in listed["items"]}
        following = r.headers["location"].removeprefix("/items/")
        assert following != target and store.claim_of(following).moderator == "mia"  # type: ignore[union-attr]
    finally:
        store.release([e for e, c in store.claims().items() if c.moderator == "mia"], "mia")
        mia.close()


def test_metrics_report_the_backlog_and_its_age(review_server: Server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    store = review_server.store
    h = {"Authorization": f"Bearer {TOKENS['mia']}"}
    with httpx.Client(base_url=review_server.url) as c:
        [got] = c.post("/api/claims", json={"n": 1}, headers=h).json()["claimed"]
        r = c.get("/metrics")
        c.delete(f"/api/claims/{got['event_id']}", headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {m.name: m.samples[0].value for m in text_string_to_metric_families(r.text)}
    rows = [review_queue.Row.parse(e, raw) for e, raw in store.review_scan()]
    oldest = min(x.decided_at for x in rows)
    assert values["moderation_review_queue_items"] == len(rows) == store.review_count()
    assert values["moderation_review_claimed_items"] == 1
    age = values["moderation_review_oldest_item_age_seconds"]
    assert 0 < age <= (datetime.now(UTC) - oldest).total_seconds()


def test_appeals_list_the_models_own_blocks_until_a_moderator_decides(store: DecisionStore) -> None:
    from worker.review.appeals import blocked_by_model

    def d(e: str, verdict: Verdict, source: str = "renders") -> Decision:
        uri = f"file:///uploads/{source}/{e}.png"
        return Decision(item_id=f"item-{e}", event_id=e, image_uri=uri, verdict=verdict, ai_score=0.99)

    others = [d("a0", Verdict.ALLOW), d("r0", Verdict.REVIEW)]
    store.write_many([d(f"b{i}", Verdict.BLOCK) for i in range(7)] + others)
    page = blocked_by_model(store, limit=50, chunk=3)
    assert [x.event_id for x in page.items] == [f"b{i}" for i in reversed(range(7))]  # newest first
    store.override("b6", Verdict.ALLOW, "mia")  # answered: leaves the list
    first = blocked_by_model(store, limit=4, chunk=3)
    assert [x.event_id for x in first.items] == ["b5", "b4", "b3", "b2"] and first.older
    rest = blocked_by_model(store, before=first.older, limit=4, chunk=3)
    assert [x.event_id for x in rest.items] == ["b1", "b0"]
    assert [x.event_id for x in blocked_by_model(store, search="ITEM-B3").items] == ["b3"]


def test_disable_and_remove_user_end_sessions_and_tokens_at_once(review_server: Server) -> None:
    import re

    from typer.testing import CliRunner

    from worker.cli.main import app
    from worker.review.auth import read_store

    path = review_server.settings.review_users_file
    assert path is not None
    files = ["--users-file", str(path)]
    add = ["review", "add-user", "zed", *files, "--password-stdin", "--token"]
    result = CliRunner().invoke(app, add, input="zed-password-1\n")
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    with httpx.Client(base_url=review_server.url, follow_redirects=False) as c:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
        assert csrf
        form = {"username": "zed", "password": "zed-password-1", "csrf_token": csrf.group(1)}
        assert c.post("/login", data=form, headers={"Origin": review_server.url}).status_code == 303
        assert c.get("/queue").status_code == 200
        h = {"Authorization": f"Bearer {token}"}
        assert c.get("/api/me", headers=h).status_code == 200

        result = CliRunner().invoke(app, ["review", "disable-user", "zed", *files])
        assert result.exit_code == 0 and "disabled" in result.output, result.output
        r = c.get("/queue")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")  # the session ended
        assert c.get("/api/me", headers=h).status_code == 401
        again = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
        assert again
        form["csrf_token"] = again.group(1)
        assert c.post("/login", data=form, headers={"Origin": review_server.url}).status_code == 401
    assert "zed" in read_store(path)

    result = CliRunner().invoke(app, ["review", "remove-user", "zed", *files])
    assert result.exit_code == 0, result.output
    assert "zed" not in read_store(path) and "mia" in read_store(path)
    assert path.stat().st_mode & 0o077 == 0
    result = CliRunner().invoke(app, ["review", "remove-user", "zed", *files])
    assert result.exit_code != 0 and "no account 'zed'" in result.output
