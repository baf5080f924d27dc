"""``create_app(settings)``: the FastAPI app behind ``moderation api`` (also ``uvicorn --factory
worker.api.app:app_from_env`` for several processes)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api import routes
from worker.api.context import Api, APIError, ApiMetrics, BodyTooLarge, short_errors
from worker.api.tokens import TokenStore
from worker.delivery.store import DecisionStore
from worker.delivery.webhook import OUTCOMES, WebhookQueue
from worker.ingress.producer import Producer
from worker.settings import Settings

log = structlog.get_logger(__name__)

_CONVERTOR = re.compile(r":\w+}")
_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def error_json(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status, headers=headers)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_json(413, "body_too_large", f"request body larger than {self.limit} bytes")(
                scope, receive, send
            )
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class WebhookOutcomes(Collector):
    """Fleet-wide webhook outcomes and waiting deliveries, read from Redis at scrape time."""

    def __init__(self, queue: WebhookQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Any]:
        try:
            counts, waiting = self.queue.outcomes(), self.queue.waiting()
        except redis.RedisError:
            return
        family = CounterMetricFamily(
            "moderation_webhook_fleet_deliveries",
            "Webhook delivery attempts by every dispatcher, by outcome (from Redis).",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            family.add_metric([outcome], counts.get(outcome, 0))
        yield family
        yield GaugeMetricFamily(
            "moderation_webhook_waiting", "Deliveries scheduled, not yet settled.", waiting
        )


def create_app(settings: Settings, producer: Producer | None = None) -> FastAPI:
    redis_url = settings.require_redis("the API queues events in Redis")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    registry = CollectorRegistry()
    api = Api(
        settings=settings,
        producer=producer or Producer(settings),
        store=DecisionStore(client, settings.namespace),
        tokens=TokenStore(client, settings.namespace),
        metrics=ApiMetrics(registry),
    )
    registry.register(WebhookOutcomes(WebhookQueue(client, settings.namespace)))
    app = FastAPI(
        title="moderation API",
        version="1",
        description="Submit images for AI-generated-content moderation and read the decisions back. "
        "Auth: `Authorization: Bearer <token>` (`moderation api token create NAME --scope submit,read`).",
        redoc_url=None,
    )
    app.state.api = api
    app.include_router(routes.router)
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        name = _CONVERTOR.sub("}", getattr(route, "path", "unmatched"))  # the OpenAPI path, bounded labels
        api.metrics.requests.labels(name, str(response.status_code)).inc()
        api.metrics.latency.labels(name).observe(time.perf_counter() - t0)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _CODES.get(exc.status_code, "http_error")
        return error_json(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message, details = short_errors(list(exc.errors()))
        return error_json(422, "invalid_request", message, details=details)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        if isinstance(exc, redis.RedisError):
            return error_json(
                503, "unavailable", "the decision store is unreachable; retry later", {"Retry-After": "5"}
            )
        log.error("api_internal_error", path=request.url.path, exc_info=exc)
        return error_json(500, "internal_error", "internal error")

    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory worker.api.app:app_from_env``: settings from the environment."""
    return create_app(Settings())
