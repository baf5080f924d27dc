"""Who may do what, against the real server: sign-in, CSRF and Origin checks, admin-only parts, API tokens."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.review.conftest import PASSWORDS, TOKENS, Server
from worker.records import Verdict

pytestmark = pytest.mark.integration

EVIL = "https://evil.example"


def client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, follow_redirects=False, timeout=30)


def csrf_in(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "page carries no CSRF token"
    return match.group(1)


def sign_in(server: Server, name: str) -> httpx.Client:
    c = client(server)
    token = csrf_in(c.get("/login").text)
    r = c.post(
        "/login",
        data={"username": name, "password": PASSWORDS[name], "csrf_token": token, "next": "/queue"},
        headers={"Origin": server.url},
    )
    assert r.status_code == 303 and r.headers["location"] == "/queue", r.text
    return c


@pytest.fixture
def mia(review_server: Server) -> Iterator[httpx.Client]:
    c = sign_in(review_server, "mia")
    yield c
    c.close()


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def test_pages_redirect_to_sign_in_and_api_answers_401(review_server: Server) -> None:
    event = review_server.decided.review_items()[0].event_id
    with client(review_server) as c:
        for path in (
            "/queue",
            f"/items/{event}",
            f"/items/{event}/image",
            f"/items/{event}/heatmap",
            "/admin",
        ):
            r = c.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/login?next=%2F"), path
        for path in ("/api/me", "/api/queue", f"/api/items/{event}", f"/api/items/{event}/heatmap"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert c.post(f"/api/items/{event}/override", json={"verdict": "allow"}).status_code == 401
        wrong = {"Authorization": "Bearer not-a-token"}
        assert c.get("/api/queue", headers=wrong).status_code == 401
        assert c.post(f"/items/{event}/action", data={"action": "mark_real"}).status_code == 303
    assert review_server.store.get(event).verdict == Verdict.REVIEW  # type: ignore[union-attr]


def test_sign_in_refuses_wrong_password_and_sets_a_strict_cookie(review_server: Server) -> None:
    with client(review_server) as c:
        r = c.get("/login")
        cookie = r.headers["set-cookie"].lower()
        assert "samesite=strict" in cookie and "httponly" in cookie
        assert "default-src 'self'" in r.headers["content-security-policy"]
        token = csrf_in(r.text)
        r = c.post(
            "/login",
            data={"username": "mia", "password": "wrong-password", "csrf_token": token},
            headers={"Origin": review_server.url},
        )
        assert r.status_code == 401 and "Wrong name or password" in r.text
        r = c.post(
            "/login",
            data={"username": "nobody", "password": "whatever-pass", "csrf_token": token},
            headers={"Origin": review_server.url},
        )
        assert r.status_code == 401
        assert c.get("/queue").status_code == 303  # still signed out
        r = c.post(
            "/login",
            data={"username": "mia", "password": PASSWORDS["mia"], "csrf_token": "forged"},
            headers={"Origin": review_server.url},
        )
        assert r.status_code == 403  # right password, forged form
        r = c.post(
            "/login",
            data={
                "username": "mia",
                "password": PASSWORDS["mia"],
                "csrf_token": token,
                "next": "//evil.example/x",
            },
            headers={"Origin": review_server.url},
        )
        assert r.status_code == 303 and r.headers["location"] == "/queue"  # no open redirect


def test_a_guessing_client_is_slowed_without_locking_the_owner_out(review_server: Server) -> None:
    """Delays grow per client address (1 s, 2 s, 4 s ...); the name's owner signs in from elsewhere."""
    with client(review_server) as c:
        token = csrf_in(c.get("/login").text)
        codes = [
            c.post(
                "/login",
                data={"username": "mia", "password": f"guess-{i}", "csrf_token": token},
                headers={"Origin": review_server.url, "X-Forwarded-For": "10.9.9.9"},
            ).status_code
            for i in range(10)
        ]
    free = review_server.settings.review_login_free_attempts
    assert codes[:free] == [401] * free and 429 in codes[free:]
    other = sign_in(review_server, "mia")  # the owner, from another address, is not locked out
    try:
        assert other.get("/queue").status_code == 200
    finally:
        other.close()


def test_cross_site_form_posts_are_refused(review_server: Server, mia: httpx.Client) -> None:
    store = review_server.store
    target, other = review_server.decided.review_items()[-1], review_server.decided.review_items()[-2]
    html = mia.get(f"/items/{target.event_id}").text
    token = csrf_in(html)
    url = f"/items/{target.event_id}/action"
    form = {"action": "mark_real"}
    own = {"Origin": review_server.url}
    attempts = [
        (form, own),  # no token
        ({**form, "csrf_token": "x" * len(token)}, own),  # wrong token
        ({**form, "csrf_token": "é" * len(token)}, own),  # wrong and not even ASCII
        ({**form, "csrf_token": token}, {"Origin": EVIL}),  # right token, foreign page
        ({**form, "csrf_token": token}, {"Referer": f"{EVIL}/page"}),  # no Origin, foreign Referer
        ({**form, "csrf_token": token}, {}),  # neither Origin nor Referer
    ]
    for data, headers in attempts:
        r = mia.post(url, data=data, headers=headers)
        assert r.status_code == 403, (data, headers)
    r = mia.post(
        f"/api/items/{target.event_id}/override",
        json={"verdict": "allow"},
        headers={"Origin": review_server.url},
    )
    assert r.status_code == 403  # the session alone is not enough for the API: it needs X-CSRF-Token
    assert store.get(target.event_id).verdict == Verdict.REVIEW  # type: ignore[union-attr]
    assert store.audit_of(target.event_id) == []

    r = mia.post(url, data={**form, "csrf_token": token}, headers=own)  # the page's own form
    assert r.status_code == 303
    assert store.get(target.event_id).verdict == Verdict.ALLOW  # type: ignore[union-attr]
    r = mia.post(
        f"/api/items/{other.event_id}/override",
        json={"verdict": "block", "note": "from the page's script"},
        headers={"Origin": review_server.url, "X-CSRF-Token": token},
    )
    assert r.status_code == 200 and r.json()["decision"]["verdict"] == "block"


def test_admin_parts_are_for_admins_only(review_server: Server, mia: httpx.Client) -> None:
    store = review_server.store
    for d in review_server.decided.review_items()[2:4]:
        if not store.audit_of(d.event_id):  # at least two audit entries to page through
            store.override(d.event_id, Verdict.BLOCK, "ada")
    want = [dict(f) for _, f in reversed(store.r.xrange(store.keys.overrides))]
    assert len(want) >= 2
    r = mia.get("/admin")
    assert r.status_code == 403 and "admins" in r.text
    with client(review_server) as c:
        assert c.get("/api/audit", headers=bearer("mia")).status_code == 403
        r = c.get("/api/audit", headers=bearer("ada"))
        assert r.status_code == 200
        entries = r.json()
        assert [{k: v for k, v in e.items() if k != "id"} for e in entries] == want  # newest first
        [newest] = c.get("/api/audit", params={"count": 1}, headers=bearer("ada")).json()
        older = c.get("/api/audit", params={"before": newest["id"]}, headers=bearer("ada")).json()
        assert newest == entries[0] and older == entries[1:]
    ada = sign_in(review_server, "ada")
    r = ada.get("/admin")
    assert r.status_code == 200
    assert "Audit log" in r.text and "mia" in r.text and "ada" in r.text
    assert 'href="/admin"' in ada.get("/queue").text
    assert ada.get("/admin", params={"before": "0-0"}).status_code == 200
    assert ada.get("/admin", params={"before": "x; FLUSHALL"}).status_code == 422
    ada.close()
    assert 'href="/admin"' not in mia.get("/queue").text


def test_api_with_a_token_lists_filters_and_overrides(review_server: Server) -> None:
    store = review_server.store
    waiting = [d for d in review_server.decided.review_items() if store.in_review(d.event_id)]
    with client(review_server) as c:
        h = bearer("mia")
        assert c.get("/api/me", headers=h).json() == {"name": "mia", "role": "moderator"}
        body = c.get("/api/queue", headers=h).json()
        assert body["total"] == len(waiting)
        assert [i["decision"]["event_id"] for i in body["items"]] == [d.event_id for d in waiting]

        renders = c.get("/api/queue", params={"source": "file:renders"}, headers=h).json()["items"]
        assert renders and all(i["source"] == "file:renders" for i in renders)
        assert all("/renders/" in i["decision"]["image_uri"] for i in renders)
        oldest = c.get("/api/queue", params={"sort": "oldest", "limit": 3}, headers=h).json()["items"]
        times = [i["decision"]["decided_at"] for i in oldest]
        assert len(times) == 3 and times == sorted(times)
        version = waiting[0].model_version
        assert c.get("/api/queue", params={"model_version": version}, headers=h).json()["total"] == len(
            waiting
        )
        assert c.get("/api/queue", params={"model_version": "other"}, headers=h).json()["total"] == 0
        assert c.get("/api/queue", params={"since": "2999-01-01"}, headers=h).json()["total"] == 0
        assert c.get("/api/queue", params={"until": "2000-01-01"}, headers=h).json()["total"] == 0
        assert c.get("/api/queue", params={"sort": "random"}, headers=h).status_code == 422

        target = waiting[0]
        r = c.post(f"/api/items/{target.event_id}/override", json={"verdict": "review"}, headers=h)
        assert r.status_code == 422
        assert c.post("/api/items/nope/override", json={"verdict": "block"}, headers=h).status_code == 404
        r = c.post(
            f"/api/items/{target.event_id}/override", json={"verdict": "block", "note": "api"}, headers=h
        )
        assert r.status_code == 200, r.text
        assert r.json()["previous_verdict"] == "review" and r.json()["decision"]["verdict"] == "block"
        item = c.get(f"/api/items/{target.event_id}", headers=h).json()
        assert item["in_review"] is False
        assert [(e["who"], e["verdict"]) for e in item["history"]][-1] == ("mia", "block")
        assert c.get("/api/queue", headers=h).json()["total"] == len(waiting) - 1
    assert store.get(target.event_id).source == "moderator:mia"  # type: ignore[union-attr]


def test_images_are_served_upright_and_at_the_crop_boxes_scale(
    review_server: Server, mia: httpx.Client
) -> None:
    import io

    from PIL import Image

    from worker.review.media import crop_size_of, display_size

    by_item = {d.item_id: d for d in review_server.decided.decisions}
    rotated, tiny = by_item["upload-rotated"], by_item["upload-tiny"]
    r = mia.get(f"/items/{rotated.event_id}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.size == rotated.image_size == (451, 300)  # EXIF orientation applied: upright again
    r = mia.get(f"/items/{tiny.event_id}/image")
    with Image.open(io.BytesIO(r.content)) as img:
        assert tiny.image_size == (48, 40)
        assert img.size == display_size((48, 40), crop_size_of(tiny)) == (116, 96)
        assert max(c.box.bottom for c in tiny.crops) <= img.height
    r = mia.get(f"/items/{tiny.event_id}/heatmap")
    assert r.status_code == 200 and r.headers["x-heatmap-model-version"] == tiny.model_version
    assert mia.get("/items/nope").status_code == 404


def test_an_error_decision_has_a_page_without_image_or_heatmap(
    review_server: Server, mia: httpx.Client
) -> None:
    [error] = [d for d in review_server.decided.decisions if d.verdict == Verdict.ERROR]
    assert error.reason is not None and error.reason.value == "file_not_found"
    r = mia.get("/find", params={"item_id": error.item_id})
    assert r.status_code == 303 and r.headers["location"] == f"/items/{error.event_id}"
    page = mia.get(r.headers["location"])
    assert page.status_code == 200 and "file_not_found" in page.text and 'id="heatmap"' not in page.text
    assert mia.get(f"/items/{error.event_id}/image").status_code == 502
    assert mia.get(f"/items/{error.event_id}/heatmap").status_code == 404
    assert mia.get("/find", params={"item_id": "no-such-item"}).status_code == 404
