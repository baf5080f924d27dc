"""The review page's sign-in under attack, against a real uvicorn server and a real Redis.

Guessers are slowed per client address (exponential delay, counted atomically, so concurrent guesses do not
race past the limit) and per name (a low ceiling, so the owner is never locked out); signing out revokes the
session server-side, so a copied cookie stops working; event ids that look like paths stay one path segment.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest

from tests.served import served
from worker.delivery.store import DecisionStore
from worker.keys import Keys
from worker.records import Decision, Thresholds, Verdict
from worker.review.app import create_app
from worker.review.auth import hash_password
from worker.settings import Settings

PASSWORD = "owner-password-1"


@dataclass
class Page:
    url: str
    settings: Settings
    store: DecisionStore


def serve(settings: Settings) -> Iterator[Page]:
    store = DecisionStore.from_url(settings.redis_url or "", settings.namespace)
    with served(create_app(settings, store)) as url:
        yield Page(url, settings, store)


@pytest.fixture
def page(redis_url: str, tmp_path: Path) -> Iterator[Page]:
    settings = Settings(
        home=tmp_path / "home",
        redis_url=redis_url,
        namespace=f"hr{uuid.uuid4().hex[:8]}",
        review_users={"owner": {"hash": hash_password(PASSWORD), "role": "admin"}},
        review_login_free_attempts=3,
        review_login_delay_s=60.0,  # far longer than the test: a refused guess is refused for sure
        review_login_name_free_attempts=6,
        review_login_name_max_delay_s=2.0,
    )
    yield from serve(settings)


def csrf_in(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match
    return match.group(1)


def login(page: Page, c: httpx.Client, name: str, password: str, address: str) -> httpx.Response:
    """One sign-in attempt from ``address`` (uvicorn takes X-Forwarded-For from a local proxy)."""
    token = csrf_in(c.get("/login").text)
    return c.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": token, "next": "/queue"},
        headers={"Origin": page.url, "X-Forwarded-For": address},
    )


def client(page: Page) -> httpx.Client:
    return httpx.Client(base_url=page.url, follow_redirects=False, timeout=60)


def test_a_guessing_client_is_slowed_and_the_owner_still_signs_in(page: Page) -> None:
    with client(page) as attacker:
        codes = [login(page, attacker, "owner", f"guess-{i}", "10.6.6.6") for i in range(6)]
    assert [r.status_code for r in codes] == [401, 401, 401, 429, 429, 429]
    assert int(codes[3].headers["retry-after"]) > 30
    with client(page) as owner:
        r = login(page, owner, "owner", PASSWORD, "10.1.1.1")
        assert r.status_code == 303 and owner.get("/queue").status_code == 200


def test_concurrent_guesses_do_not_race_past_the_limit(page: Page) -> None:
    def guess(i: int) -> int:
        with client(page) as c:
            return login(page, c, "owner", f"guess-{i}", "10.7.7.7").status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(guess, range(40)))
    free = page.settings.review_login_free_attempts
    # Exactly ``free`` attempts were let through to a password check (some of those may still have been
    # turned away for a busy verifier); every other guess was refused before any check.
    counted = page.store.r.hget(Keys(page.settings.namespace).login_client("10.7.7.7"), "n")
    assert int(counted) == free
    assert 1 <= codes.count(401) <= free and codes.count(401) + codes.count(429) == 40


def test_guesses_from_many_addresses_delay_a_name_but_never_lock_its_owner_out(page: Page) -> None:
    with client(page) as c:
        codes = [login(page, c, "owner", f"guess-{i}", f"10.8.0.{i}").status_code for i in range(10)]
    free = page.settings.review_login_name_free_attempts
    assert codes[:free] == [401] * free and 429 in codes[free:]
    with client(page) as owner:
        deadline = time.monotonic() + 30
        while (r := login(page, owner, "owner", PASSWORD, "10.1.1.2")).status_code == 429:
            assert time.monotonic() < deadline, "the owner was locked out"
            time.sleep(float(r.headers["retry-after"]))
        assert r.status_code == 303


def test_signing_out_revokes_copies_of_the_session_cookie(page: Page) -> None:
    with client(page) as c:
        assert login(page, c, "owner", PASSWORD, "10.2.2.2").status_code == 303
        copied = dict(c.cookies)
        assert c.get("/queue").status_code == 200
        token = csrf_in(c.get("/queue").text)
        r = c.post("/logout", data={"csrf_token": token}, headers={"Origin": page.url})
        assert r.status_code == 303
    with httpx.Client(base_url=page.url, cookies=copied, follow_redirects=False) as thief:
        assert thief.get("/queue").status_code == 303  # back to the sign-in page
        assert thief.get("/api/me").status_code == 401


def test_event_ids_that_look_like_paths_stay_one_segment(page: Page) -> None:
    ids = ["../admin", "a/../../logout", "x?y=1#z", "%2e%2e%2fadmin", 'q"><script>']
    decisions = [
        Decision(
            item_id=f"item {i}",
            event_id=eid,
            image_uri=f"s3://bucket/{i}.jpg",
            verdict=Verdict.REVIEW,
            ai_score=0.6 + i / 100,
            thresholds=Thresholds(),
            model_version="m",
        )
        for i, eid in enumerate(ids)
    ]
    assert all(page.store.write_many(decisions))
    with client(page) as c:
        assert login(page, c, "owner", PASSWORD, "10.3.3.3").status_code == 303
        html = c.get("/queue").text
        links = set(re.findall(r'(?:href|src|data-href|action)="(/items/[^"]*)"', html))
        assert links, "no item links on the queue page"
        for eid in [e for e in ids if "/" not in e]:  # an id with "/" has no page; its link goes nowhere else
            r = c.get(f"/items/{quote(eid, safe='')}")
            assert r.status_code == 200, (eid, r.status_code)
            links |= set(re.findall(r'(?:href|src|action)="(/items/[^"]*)"', r.text))
        segments = set()
        for link in links:
            raw = link.removeprefix("/items/")
            segment, rest = re.match(r"([^/?]*)(.*)", raw).groups()  # type: ignore[union-attr]
            assert unquote(segment) in ids, link  # the whole id, as one segment
            assert rest in ("", "/image", "/crop", "/heatmap", "/thumb", "/action") or rest.startswith("?"), (
                link
            )
            segments.add(unquote(segment))
        assert segments == set(ids)
