"""The moderator review page and its JSON API: one FastAPI app, built by :func:`create_app` from settings.

Server-rendered Jinja2 pages (fast on any laptop, work without JavaScript; a small script adds keyboard
shortcuts), a signed session cookie for browsers, bearer tokens for tools. Every write goes through
:meth:`worker.delivery.store.DecisionStore.override`, so the page, the API and any future tool share one audit
trail.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from worker.delivery.store import DecisionStore
from worker.review import api, pages
from worker.review.auth import session_secret
from worker.review.context import HERE, Review
from worker.review.guards import LoginRequired
from worker.review.views import make_templates, render
from worker.settings import Settings

SESSION_COOKIE = "moderation_review"
# Pages only load our own files; nothing inline, nothing from elsewhere, never framed.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


def create_app(settings: Settings, store: DecisionStore | None = None) -> FastAPI:
    if store is None:
        redis_url = settings.require_redis("the review page reads decisions from Redis")
        store = DecisionStore.from_url(redis_url, settings.namespace)
    review = Review.build(settings, store, make_templates(HERE / "templates"))

    app = FastAPI(
        title="moderation review API",
        description="Review queue, decisions and overrides. Auth: `Authorization: Bearer <token>`.",
        docs_url=None,  # Swagger UI loads from a CDN; the schema is at /api/openapi.json
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.review = review
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie=SESSION_COOKIE,
        max_age=settings.review_session_max_age_s,
        same_site="strict",
        https_only=settings.review_https_only,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # --- errors: HTML for people, JSON for tools ----------------------------------------------------
    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.target, safe='')}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        ctx = {"status": exc.status_code, "message": exc.detail}
        return render(request, review, "error.html", ctx, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        detail = [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors()]
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, 422)
        message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
        return render(request, review, "error.html", {"status": 422, "message": message}, 422)

    return app
