"""What every route shares (built once by ``create_app``, kept on ``app.state.api``), errors and auth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.api.tokens import Scope, TokenInfo, TokenStore
from worker.delivery.store import DecisionStore
from worker.ingress.producer import BacklogFull, Producer
from worker.records import Event
from worker.settings import Settings


class APIError(Exception):
    """An answer with a status, a machine-readable code and a message: ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class BodyTooLarge(HTTPException):
    """Raised while the body is read (an HTTPException, so FastAPI's body parser lets it through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "moderation_api_requests",
            "HTTP requests, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "moderation_api_request_seconds", "HTTP request time, by route.", ["route"], registry=registry
        )
        self.events = Counter(
            "moderation_api_events_submitted", "Events accepted over HTTP.", registry=registry
        )
        self.backlog = Gauge(
            "moderation_api_backlog", "Submitted, undecided events at the last check.", registry=registry
        )
        self.refused = Counter(
            "moderation_api_backlog_refusals",
            "Submissions refused because the backlog was full.",
            registry=registry,
        )


@dataclass
class Api:
    settings: Settings
    producer: Producer
    store: DecisionStore
    tokens: TokenStore
    metrics: ApiMetrics

    def backlog(self) -> int:
        """Entries the event streams hold (not yet read, or read and not yet decided): how far behind the
        workers are. Asked of the Producer, the one place that knows the ingress."""
        n = sum(self.producer.backlog().values())
        self.metrics.backlog.set(n)
        return n

    def submit(self, events: list[Event]) -> None:
        """Queue events; a full stream (the Producer's own limit) answers like the API's backlog limit."""
        try:
            self.producer.submit_many(events)
        except BacklogFull as exc:
            self.metrics.refused.inc()
            raise APIError(503, "backlog_full", str(exc), {"Retry-After": "5"}) from exc

    def check_backlog(self, adding: int) -> None:
        if self.backlog() + adding > self.settings.api_max_backlog:
            self.metrics.refused.inc()
            raise APIError(
                503,
                "backlog_full",
                f"more than {self.settings.api_max_backlog} events are waiting for a decision; retry later",
                {"Retry-After": "5"},
            )


def get_api(request: Request) -> Api:
    api: Api = request.app.state.api
    return api


Ctx = Annotated[Api, Depends(get_api)]
_bearer = HTTPBearer(auto_error=False, description="A token from `moderation api token create`.")


def require(scope: Scope) -> Callable[..., TokenInfo]:
    """A dependency: the caller's token, which must carry ``scope``."""

    def check(
        api: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> TokenInfo:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise APIError(401, "unauthorized", "send Authorization: Bearer <token>", challenge)
        info = api.tokens.lookup(credentials.credentials)
        if info is None:
            raise APIError(401, "unauthorized", "unknown or revoked token", challenge)
        if scope not in info.scopes:
            raise APIError(403, "forbidden", f"this token lacks the {scope.value!r} scope")
        return info

    return check


Submitter = Annotated[TokenInfo, Depends(require(Scope.SUBMIT))]
Reader = Annotated[TokenInfo, Depends(require(Scope.READ))]


def short_errors(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")} for e in errors[:20]]
    message = "; ".join(f"{'.'.join(d['loc'][1:] or d['loc'])}: {d['msg']}" for d in details[:5])
    return message or "invalid request", details
