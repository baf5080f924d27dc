"""Durable, signed callbacks: real workers, a real review server, real receivers; short retry schedules."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.api.conftest import api_env, running_api
from tests.api.receiver import Receiver
from tests.conftest import run_cli
from tests.core import images
from tests.waiting import eventually
from tests.worker_proc import running_worker
from worker.delivery.webhook import Dispatcher, WebhookQueue, Webhooks, callback_refusal
from worker.process.localredis import free_port
from worker.records import Decision, Thresholds, Verdict
from worker.review.auth import Role, User, token_digest, write_user
from worker.scoring.checkpoint import init_checkpoint
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = json.dumps([0.2, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
REVIEWER_TOKEN = "reviewer-api-token-0123456789"


@pytest.fixture(scope="module")
def review_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every image lands in review (thresholds 0 and 1), so a moderator's verdict is the final one."""
    path = tmp_path_factory.mktemp("ckpt") / "review-all"
    init_checkpoint(
        "test_convnext", path, crop_size=64, num_crops=1, seed=3, thresholds=Thresholds(review=0.0, block=1.0)
    )
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("hook-imgs") / "a.jpg"
    p.write_bytes(images.jpeg(120, 90, seed=5))
    return p


def hook_env(port: int, **extra: str) -> dict[str, str]:
    return {
        "MODERATION_WEBHOOK_SECRET": SECRET,
        "MODERATION_CALLBACK_ALLOW_HOSTS": json.dumps([f"127.0.0.1:{port}"]),
        "MODERATION_CALLBACK_ALLOW_HTTP": "true",
        "MODERATION_WEBHOOK_RETRY_SCHEDULE_S": FAST,
        **extra,
    }


@pytest.fixture
def review_server(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """``moderation review`` on a free port with one moderator who has an API token."""
    home = tmp_path / "review-home"
    write_user(
        home / "review-users.json",
        User(name="mia", role=Role.MODERATOR, tokens=(token_digest(REVIEWER_TOKEN),)),
    )
    port = free_port()
    log = (tmp_path / "review.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "review", "--port", str(port)],
        env=api_env(redis_url, home),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{url}/login", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        eventually(up, "review page up", 60)
        assert proc.poll() is None, (tmp_path / "review.log").read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_override_reaches_the_callback_with_the_final_verdict(
    redis_url: str,
    tmp_path: Path,
    review_checkpoint: Path,
    image: Path,
    review_server: str,
    make_token: Callable[..., str],
) -> None:
    receiver = Receiver(free_port(), SECRET).start()
    env = hook_env(receiver.port)
    try:
        with (
            running_worker(redis_url, tmp_path / "w", review_checkpoint, env=env),
            running_api(redis_url, tmp_path / "api", **env) as api,
            api.client(make_token("pipeline")) as http,
        ):
            body = {"item_id": "upload-1", "image_uri": str(image), "callback_url": receiver.url}
            resp = http.post("/v1/events", json={**body, "metadata": {"user": "u1"}})
            assert resp.status_code == 202, resp.text
            eid = resp.json()["event_ids"][0]
            first = eventually(receiver.verified, "the model's decision delivered", 60)
            assert first[0]["type"] == "decision.made"
            assert first[0]["data"]["verdict"] == "review"
            override = httpx.post(
                f"{review_server}/api/items/{eid}/override",
                json={"verdict": "block", "note": "generated"},
                headers={"Authorization": f"Bearer {REVIEWER_TOKEN}"},
                trust_env=False,
            )
            assert override.status_code == 200, override.text
            eventually(lambda: len(receiver.verified()) >= 2, "the override delivered", 60)
            final = http.get(f"/v1/decisions/{eid}").json()
    finally:
        receiver.stop()
    overridden = receiver.verified()[1]
    assert overridden["type"] == "decision.overridden"
    data = overridden["data"]
    assert data["event_id"] == eid and data["verdict"] == "block" and data["source"] == "moderator:mia"
    assert data["metadata"] == {"user": "u1"}
    assert final["verdict"] == "block" and final["source"] == "moderator:mia"
    ids = [d.headers["webhook-id"] for d in receiver.got]
    assert len(set(ids)) == 2, ids  # two messages, each delivered once
    assert all(d.payload is not None for d in receiver.got)  # every delivery verified


def test_a_receiver_that_was_down_gets_the_decision_afterwards(
    redis_url: str, tmp_path: Path, tiny_checkpoint: Path, image: Path, make_token: Callable[..., str]
) -> None:
    port = free_port()  # nothing listens here yet: connection refused
    env = hook_env(port)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = WebhookQueue(client, "moderation")
    receiver = Receiver(port, SECRET)
    with (
        running_worker(redis_url, tmp_path / "w", tiny_checkpoint, env=env),
        running_api(redis_url, tmp_path / "api", **env) as api,
        api.client(make_token("pipeline")) as http,
    ):
        url = f"http://127.0.0.1:{port}/hook"
        resp = http.post("/v1/events", json={"item_id": "x", "image_uri": str(image), "callback_url": url})
        eid = resp.json()["event_ids"][0]
        eventually(lambda: queue.outcomes().get("retried", 0) >= 3, "three failed attempts", 60)
        assert receiver.got == [] and queue.waiting() == 1
        receiver.start()
        try:
            got = eventually(receiver.verified, "delivery after the receiver came back", 60)
            decision = http.get(f"/v1/decisions/{eid}").json()
            metrics = http.get("/metrics").text
        finally:
            receiver.stop()
    assert got[0]["data"] == decision
    assert len(receiver.got) == 1
    assert queue.waiting() == 0 and queue.dead_letters() == []
    assert 'moderation_webhook_fleet_deliveries_total{outcome="delivered"} 1.0' in metrics


def _decision(eid: str = "e1") -> Decision:
    return Decision(item_id="i1", event_id=eid, image_uri="s3://b/k.jpg", verdict=Verdict.ALLOW, ai_score=0.1)


def test_policy_secret_redirects_and_dead_letters(redis_url: str, tmp_path: Path) -> None:
    receiver = Receiver(free_port(), SECRET).start()
    base = Settings(
        redis_url=redis_url,
        home=tmp_path,
        webhook_secret=SECRET,
        callback_allow_hosts=[f"127.0.0.1:{receiver.port}"],
        callback_allow_http=True,
        webhook_retry_schedule_s=[0.0],
        webhook_dispatch_in_worker=False,
    )
    queue = WebhookQueue(redis.Redis.from_url(redis_url, decode_responses=True), "moderation")
    try:
        # no secret: nothing is sent unsigned, the delivery is dead-lettered with the reason
        unsigned = base.model_copy(update={"webhook_secret": None})
        Webhooks(unsigned).send(receiver.url, _decision("unsigned"))
        assert Dispatcher(unsigned).run_once() == 1
        # a host or port not on the allow-list, credentials in the URL
        hooks = Webhooks(base)
        hooks.send(f"http://127.0.0.1:{receiver.port + 1}/hook", _decision("port"))
        hooks.send(f"http://u:p@127.0.0.1:{receiver.port}/hook", _decision("creds"))
        dispatcher = Dispatcher(base)
        assert dispatcher.run_once() == 2
        assert receiver.got == []
        # a redirect is not followed: two attempts (schedule of one retry), then dead
        receiver.status, receiver.location = 307, f"http://127.0.0.1:{receiver.port}/elsewhere"
        hooks.send(receiver.url, _decision("redirect"))
        eventually(lambda: dispatcher.run_once() == 0 and queue.waiting() == 0, "redirects settled", 30)
        assert [d.path for d in receiver.got] == ["/hook", "/hook"]
        # 410 Gone: dead at once
        receiver.status, receiver.location = 410, None
        hooks.send(receiver.url, _decision("gone"))
        assert dispatcher.run_once() == 1
        reasons = {f["event_id"]: f["reason"] for _, f in queue.dead_letters()}
        assert reasons == {
            "unsigned": "no_secret",
            "port": "callback_refused",
            "creds": "callback_refused",
            "redirect": "retries_exhausted",
            "gone": "gone",
        }
        listed = run_cli("webhooks", "dead", "--json", REDIS_URL=redis_url)
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {r["event_id"]: r["reason"] for r in rows} == reasons
        assert "whsec" not in listed.stdout
        # once the receiver is fixed, a replay delivers what was given up
        receiver.status = 204
        replay = run_cli("webhooks", "replay", REDIS_URL=redis_url)
        assert replay.returncode == 0 and "rescheduled 5" in replay.stdout, replay.stdout
        eventually(lambda: dispatcher.run_once() == 0 and queue.waiting() == 0, "replays settled", 30)
        delivered = {p["data"]["event_id"] for p in receiver.verified()}
        assert {"unsigned", "redirect", "gone"} <= delivered and not {"port", "creds"} & delivered
        assert int(dispatcher.outcomes.labels("delivered")._value.get()) == 3
    finally:
        receiver.stop()


def test_a_slow_receiver_does_not_hold_up_the_worker_drain(
    redis_url: str, tmp_path: Path, tiny_checkpoint: Path, image: Path
) -> None:
    from worker.ingress.producer import Producer

    receiver = Receiver(free_port(), SECRET, hang_s=120).start()
    env = hook_env(receiver.port, MODERATION_WEBHOOK_TIMEOUT_S="1")
    queue = WebhookQueue(redis.Redis.from_url(redis_url, decode_responses=True), "moderation")
    producer = Producer(Settings(redis_url=redis_url, home=tmp_path))
    try:
        with running_worker(redis_url, tmp_path / "w", tiny_checkpoint, env=env) as w:
            ev = producer.submit("slow", str(image), callback_url=receiver.url)
            eventually(lambda: receiver.got, "the receiver reached", 60)
            assert w.stop() == 0  # raises if SIGTERM did not end the worker within its grace
        assert producer.wait([ev.event_id], 5)
        assert queue.waiting() == 1  # not lost: rescheduled for another attempt
    finally:
        receiver.stop()
        producer.close()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/x", True),
        ("https://hooks.example.com:443/x", True),
        ("https://hooks.example.com:8443/x", False),
        ("http://hooks.example.com/x", False),
        ("https://a.svc.example.com/x", True),
        ("https://svc.example.com.evil.net/x", False),
        ("https://10.0.0.5:9000/x", True),
        ("https://10.0.0.5/x", False),
        ("https://user:pw@hooks.example.com/x", False),
        ("https://127.0.0.1/x", False),
        ("https://[::1]:8443/x", True),
        ("file:///etc/passwd", False),
        ("not a url", False),
    ],
)
def test_callback_url_policy(url: str, allowed: bool) -> None:
    settings = Settings(
        callback_allow_hosts=["hooks.example.com", "*.svc.example.com", "10.0.0.5:9000", "[::1]:8443"]
    )
    assert (callback_refusal(settings, url) is None) == allowed, callback_refusal(settings, url)


def test_webhooks_run_delivers_on_its_own_and_counts_outcomes(redis_url: str, tmp_path: Path) -> None:
    receiver = Receiver(free_port(), SECRET).start()
    env = api_env(redis_url, tmp_path, **hook_env(receiver.port))
    metrics_port = free_port()
    missing = run_cli(
        "webhooks", "run", env={k: v for k, v in env.items() if k != "MODERATION_WEBHOOK_SECRET"}
    )
    assert missing.returncode == 2 and "MODERATION_WEBHOOK_SECRET" in missing.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "webhooks", "run", "--metrics-port", str(metrics_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings = Settings(redis_url=redis_url, home=tmp_path, webhook_dispatch_in_worker=False)
        Webhooks(settings).send(receiver.url, _decision("standalone"))
        got = eventually(receiver.verified, "delivered by `moderation webhooks run`", 60)
        assert got[0]["data"]["event_id"] == "standalone"

        def counted() -> bool:
            try:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False).text
            except httpx.HTTPError:
                return False
            return 'moderation_webhook_deliveries_total{outcome="delivered"} 1.0' in text

        eventually(counted, "the delivery counted", 30)
    finally:
        proc.terminate()
        rc = proc.wait(30)
        receiver.stop()
    assert rc == 0
