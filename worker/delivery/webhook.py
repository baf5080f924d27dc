"""Optional per-event callbacks: the decision POSTed to the event's ``callback_url``, signed and retried.

Signature: ``X-Moderation-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` with the shared
secret, and ``X-Moderation-Timestamp`` so receivers can reject replays. Callbacks are sent from a small pool
after the decision is stored: the decision store is the source of truth, a receiver that was down can read
it back.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import structlog

from worker.records import Decision
from worker.settings import Settings

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Moderation-Signature"
TIMESTAMP_HEADER = "X-Moderation-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class Webhooks:
    def __init__(self, settings: Settings, threads: int = 4) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self._client = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)

    def send(self, url: str, decision: Decision) -> Future[bool]:
        return self._pool.submit(self._deliver, url, decision)

    def _deliver(self, url: str, decision: Decision) -> bool:
        body = decision.to_json().encode()
        attempts = max(1, self.settings.webhook_retries)
        for attempt in range(1, attempts + 1):
            ts = str(int(time.time()))
            headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts}
            if self.settings.webhook_secret:
                headers[SIGNATURE_HEADER] = sign(self.settings.webhook_secret, ts, body)
            try:
                resp = self._client.post(url, content=body, headers=headers)
                if resp.status_code < 300:
                    return True
                retry = resp.status_code >= 500 or resp.status_code == 429
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                retry, why = True, f"{type(exc).__name__}: {exc}"
            log.warning("webhook_failed", url=url, event_id=decision.event_id, attempt=attempt, why=why)
            if not retry:
                return False
            if attempt < attempts:
                time.sleep(min(10.0, 0.2 * 2**attempt))
        return False

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
