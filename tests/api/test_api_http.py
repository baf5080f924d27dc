"""The HTTP API through a real uvicorn server (``moderation api``), a real Redis and a real worker."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ApiProc, running_api
from tests.conftest import REPO, run_cli
from tests.core import images
from tests.waiting import eventually
from tests.worker_proc import running_worker
from worker.records import Decision, Priority, Verdict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("api-imgs")
    for i in range(4):
        (d / f"good{i}.jpg").write_bytes(images.jpeg(96 + 32 * i, 80 + 24 * i, seed=i))
    return d


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[ApiProc]:
    with running_api(redis_url, tmp_path / "api") as proc:
        yield proc


def event(image_dir: Path, i: int, **extra: object) -> dict[str, object]:
    return {"item_id": f"item-{i}", "image_uri": str(image_dir / f"good{i % 4}.jpg"), **extra}


def test_thousand_events_over_http(
    redis_url: str,
    api: ApiProc,
    make_token: Callable[..., str],
    tiny_checkpoint: Path,
    image_dir: Path,
    tmp_path: Path,
) -> None:
    token = make_token("pipeline", "submit,read")
    sent: dict[str, dict[str, object]] = {}
    with api.client(token) as http:
        for start in range(0, 1000, 100):
            batch = [
                event(image_dir, i, metadata={"n": i}, priority="urgent" if i % 50 == 0 else "normal")
                for i in range(start, start + 100)
            ]
            resp = http.post("/v1/events", json=batch)
            assert resp.status_code == 202, resp.text
            ids = resp.json()["event_ids"]
            assert len(ids) == len(set(ids)) == 100
            sent.update(zip(ids, batch, strict=True))
        one = http.post("/v1/events", json=event(image_dir, 1000))  # a single object, not a list
        assert one.status_code == 202, one.text
        sent[one.json()["event_ids"][0]] = event(image_dir, 1000)
        with running_worker(redis_url, tmp_path / "w", tiny_checkpoint):

            def all_decided() -> bool:
                return all(http.get(f"/v1/decisions/{e}").status_code == 200 for e in list(sent)[-50:])

            eventually(all_decided, "the last events decided", 240)
            got: dict[str, Decision] = {}
            for eid in sent:

                def decided(eid: str = eid) -> httpx.Response | None:
                    return _ok(http.get(f"/v1/decisions/{eid}"))

                found = eventually(decided, eid, 120)
                assert found is not None
                got[eid] = Decision.model_validate_json(found.content)
    assert set(got) == set(sent)
    for eid, d in got.items():
        ev = sent[eid]
        assert d.event_id == eid and d.item_id == ev["item_id"]
        assert d.verdict != Verdict.ERROR, d
        assert d.metadata == ev.get("metadata", {})
        assert d.priority == Priority(str(ev.get("priority", "normal")))
    with api.client(token) as http:
        item = http.get("/v1/items/item-7")
        assert item.status_code == 200 and item.json()["item_id"] == "item-7"
        missing = http.get("/v1/decisions/never-submitted")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        metrics = http.get("/metrics").text
    assert "moderation_api_events_submitted_total 1001.0" in metrics
    assert 'route="/v1/decisions/{event_id}",status="200"' in metrics


def _ok(resp: httpx.Response) -> httpx.Response | None:
    return resp if resp.status_code == 200 else None


def test_tokens_and_scopes(
    api: ApiProc, make_token: Callable[..., str], image_dir: Path, redis_url: str
) -> None:
    reader = make_token("dashboard", "read")
    submitter = make_token("uploader", "submit")
    body = event(image_dir, 1)
    with api.client() as anon:
        resp = anon.post("/v1/events", json=body)
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "unauthorized"
        assert anon.get("/v1/decisions/x").status_code == 401
        assert anon.get("/v1/decisions/x", headers={"Authorization": "Bearer mod_forged"}).status_code == 401
        assert anon.get("/healthz").json() == {"status": "ok", "redis": True}
    with api.client(reader) as http:
        resp = http.post("/v1/events", json=body)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
        assert http.post("/v1/score", json=body).status_code == 403
        assert http.get("/v1/decisions/x").status_code == 404  # allowed, just not decided
    with api.client(submitter) as http:
        assert http.get("/v1/decisions/x").status_code == 403
        assert http.post("/v1/events", json=body).status_code == 202
    listed = run_cli("api", "token", "list", REDIS_URL=redis_url)
    assert listed.returncode == 0 and "dashboard" in listed.stdout and "uploader" in listed.stdout
    assert reader not in listed.stdout and submitter not in listed.stdout  # only hashes are stored
    assert run_cli("api", "token", "revoke", "uploader", REDIS_URL=redis_url).returncode == 0
    with api.client(submitter) as http:
        assert http.post("/v1/events", json=body).status_code == 401
    again = run_cli("api", "token", "revoke", "uploader", REDIS_URL=redis_url)
    assert again.returncode == 2 and "no token named" in again.stderr and "Traceback" not in again.stderr
    bad = run_cli("api", "token", "create", "x", "--scope", "admin", REDIS_URL=redis_url)
    assert bad.returncode == 2 and "unknown scope" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_requests_get_clear_json_errors(
    redis_url: str, tmp_path: Path, make_token: Callable[..., str], image_dir: Path
) -> None:
    with running_api(
        redis_url, tmp_path / "api", MODERATION_API_MAX_BODY_BYTES="4096", MODERATION_API_MAX_EVENTS="5"
    ) as api:
        token = make_token("t")
        with api.client(token) as http:
            big = event(image_dir, 1, metadata={"blob": "x" * 8000})
            resp = http.post("/v1/events", json=big)
            assert resp.status_code == 413, resp.text
            assert resp.json()["error"]["code"] == "body_too_large"
            raw = json.dumps(big).encode()  # no Content-Length: counted while it is read
            chunked = http.post(
                "/v1/events",
                content=(raw[i : i + 1000] for i in range(0, len(raw), 1000)),
                headers={"Content-Type": "application/json"},
            )
            assert chunked.status_code == 413, chunked.text
            assert chunked.json()["error"]["code"] == "body_too_large"
            many = http.post("/v1/events", json=[event(image_dir, i) for i in range(6)])
            assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_events"
            invalid = http.post("/v1/events", json={"item_id": "a"})
            assert invalid.status_code == 422
            err = invalid.json()["error"]
            assert err["code"] == "invalid_request" and "image_uri" in err["message"]
            extra = http.post("/v1/events", json=event(image_dir, 1, colour="red"))
            assert extra.status_code == 202, (
                "an unknown optional field is kept, not refused (forward compatible)"
            )
            notjson = http.post("/v1/events", content=b"{nope", headers={"Content-Type": "application/json"})
            assert notjson.status_code == 422 and notjson.json()["error"]["code"] == "invalid_request"
            for url in ("http://127.0.0.1:6379/", "https://user:pw@hooks.example.com/x", "ftp://x/"):
                refused = http.post("/v1/events", json=event(image_dir, 1, callback_url=url))
                assert refused.status_code == 422, url
                assert refused.json()["error"]["code"] == "callback_refused"
            nowhere = http.get("/v2/nothing")
            assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "not_found"


def test_backlog_limit_answers_503(
    redis_url: str, tmp_path: Path, make_token: Callable[..., str], image_dir: Path
) -> None:
    with (
        running_api(redis_url, tmp_path / "api", MODERATION_API_MAX_BACKLOG="5") as api,
        api.client(make_token("t")) as http,
    ):
        assert http.post("/v1/events", json=[event(image_dir, i) for i in range(4)]).status_code == 202
        over = http.post("/v1/events", json=[event(image_dir, i) for i in range(2)])
        assert over.status_code == 503, over.text
        assert over.json()["error"]["code"] == "backlog_full"
        assert int(over.headers["retry-after"]) > 0
        assert http.post("/v1/score", json=event(image_dir, 9)).status_code == 202  # the fifth fits
        assert http.post("/v1/score", json=event(image_dir, 10)).status_code == 503
        assert "moderation_api_backlog_refusals_total 2.0" in http.get("/metrics").text


def test_score_waits_for_the_decision_or_answers_202(
    redis_url: str,
    api: ApiProc,
    make_token: Callable[..., str],
    tiny_checkpoint: Path,
    image_dir: Path,
    tmp_path: Path,
) -> None:
    with api.client(make_token("t")) as http:
        late = http.post("/v1/score", params={"timeout": 0.2}, json=event(image_dir, 1))  # no worker yet
        assert late.status_code == 202, late.text
        pending = late.json()
        assert pending["status"] == "pending" and late.headers["location"] == pending["decision_url"]
        with running_worker(redis_url, tmp_path / "w", tiny_checkpoint):
            now = http.post(
                "/v1/score", params={"timeout": 60}, json=event(image_dir, 2, metadata={"k": "v"})
            )
            assert now.status_code == 200, now.text
            d = Decision.model_validate_json(now.content)
            assert d.item_id == "item-2" and d.verdict != Verdict.ERROR and d.metadata == {"k": "v"}
            eventually(lambda: _ok(http.get(pending["decision_url"])), "the first event decided", 60)


def test_openapi_document_is_served_and_matches_the_checked_in_copy(api: ApiProc) -> None:
    with api.client() as http:
        served = http.get("/openapi.json").json()
        assert http.get("/docs").status_code == 200
    checked_in = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served == checked_in, "regenerate docs/openapi.json: moderation api openapi > docs/openapi.json"
    paths = served["paths"]
    assert {"/v1/events", "/v1/decisions/{event_id}", "/v1/items/{item_id}", "/v1/score", "/healthz"} <= set(
        paths
    )
    assert "HTTPBearer" in served["components"]["securitySchemes"]
    post = paths["/v1/events"]["post"]
    assert {"202", "401", "403", "413", "422", "503"} <= set(post["responses"])
    schemas = served["components"]["schemas"]
    assert {"Event", "Decision", "ErrorResponse", "Accepted"} <= set(schemas)


def test_ids_with_slashes_and_unicode_read_back(
    redis_url: str, api: ApiProc, make_token: Callable[..., str]
) -> None:
    from urllib.parse import quote

    from worker.delivery.store import DecisionStore

    store = DecisionStore.from_url(redis_url)
    odd = Decision(
        item_id="/data/uploads/2026/a b.jpg",
        event_id="ev/../Ö匘",
        image_uri="file:///x.jpg",
        verdict=Verdict.ALLOW,
    )
    assert store.write(odd)
    with api.client(make_token("t", "read")) as http:
        by_event = http.get(f"/v1/decisions/{quote(odd.event_id, safe='')}")
        by_item = http.get(f"/v1/items/{quote(odd.item_id, safe='')}")
    assert by_event.status_code == 200 and Decision.model_validate_json(by_event.content) == odd
    assert by_item.status_code == 200 and by_item.json()["event_id"] == odd.event_id
