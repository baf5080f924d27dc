"""The moderator review page and its JSON API: one FastAPI app, built by :func:`create_app` from settings.

Server-rendered Jinja2 pages (fast on any laptop, work without JavaScript; a small script adds keyboard
shortcuts), a signed session cookie for browsers, bearer tokens for tools. Every write goes through
:meth:`worker.sink.DecisionStore.override`, so the page, the API and any future tool share one audit trail.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from worker.errors import ModerationError
from worker.fetch import Fetcher
from worker.records import Decision, Verdict
from worker.review import queue as review_queue
from worker.review.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    Directory,
    User,
    csrf_ok,
    new_csrf_token,
    safe_next,
    same_origin,
    session_secret,
)
from worker.review.heatmap import Heatmaps, HeatmapUnavailable
from worker.review.media import LRU, Images, crop_size_of, display_size, encode, image_source, thumbnail
from worker.settings import Settings
from worker.sink import DecisionStore

HERE = Path(__file__).parent
SESSION_COOKIE = "moderation_review"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
ACTIONS = {"confirm_ai": Verdict.BLOCK, "mark_real": Verdict.ALLOW}
# Pages only load our own files; nothing inline, nothing from elsewhere, never framed.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


class LoginRequired(Exception):
    def __init__(self, target: str) -> None:
        self.target = target


class OverrideRequest(BaseModel):
    verdict: Verdict = Field(description="block (confirm AI) or allow (mark real).")
    note: str = Field("", max_length=2000)


def create_app(settings: Settings, store: DecisionStore | None = None) -> FastAPI:
    if store is None:
        if not settings.redis_url:
            raise ValueError("the review page reads decisions from Redis: set MODERATION_REDIS_URL")
        store = DecisionStore.from_url(settings.redis_url, settings.namespace)
    db = store
    directory = Directory(settings)
    images = Images(Fetcher(settings))
    heatmaps = Heatmaps(settings, images)
    thumbs: LRU[bytes] = LRU(settings.review_cache_items)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(ts=_ts, ago=_ago)
    templates.env.globals.update(source_of=image_source, CSRF_FIELD=CSRF_FIELD)

    app = FastAPI(
        title="moderation review API",
        description="Review queue, decisions and overrides. Auth: `Authorization: Bearer <token>`.",
        docs_url=None,  # Swagger UI loads from a CDN; the schema is at /api/openapi.json
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.store = db
    app.state.heatmaps = heatmaps
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie=SESSION_COOKIE,
        max_age=settings.review_session_max_age_s,
        same_site="strict",
        https_only=settings.review_https_only,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    # --- errors: HTML for people, JSON for tools ----------------------------------------------------
    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.target, safe='')}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        return render(
            request, "error.html", {"status": exc.status_code, "message": exc.detail}, exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        detail = [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors()]
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, 422)
        message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
        return render(request, "error.html", {"status": 422, "message": message}, 422)

    # --- who is asking ------------------------------------------------------------------------------
    def session_user(request: Request) -> User | None:
        name = request.session.get("user")
        return directory.get(name) if isinstance(name, str) else None

    def page_user(request: Request) -> User:
        user = session_user(request)
        if user is None:
            raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return user

    def admin_user(user: Annotated[User, Depends(page_user)]) -> User:
        if not user.is_admin:
            raise HTTPException(403, "This page is for admins.")
        return user

    def own_origin(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    def check_post(request: Request, token: str | None) -> None:
        """Cross-site request forgery guard for anything a session cookie authenticates."""
        if not same_origin(
            own_origin(request),
            request.headers.get("origin"),
            request.headers.get("referer"),
            settings.review_allowed_origins,
        ):
            raise HTTPException(403, "Cross-site request refused.")
        if not csrf_ok(request.session.get("csrf"), token):
            raise HTTPException(403, "Missing or wrong CSRF token: reload the page and try again.")

    def api_user(request: Request) -> User:
        auth = request.headers.get("authorization")
        if auth:
            scheme, _, token = auth.partition(" ")
            user = directory.by_token(token.strip()) if scheme.lower() == "bearer" and token else None
            if user is None:
                raise HTTPException(401, "Invalid API token.", headers={"WWW-Authenticate": "Bearer"})
            return user
        user = session_user(request)
        if user is None:
            raise HTTPException(
                401, "Sign in or send a bearer token.", headers={"WWW-Authenticate": "Bearer"}
            )
        if request.method not in SAFE_METHODS:
            check_post(request, request.headers.get(CSRF_HEADER))
        return user

    def api_admin(user: Annotated[User, Depends(api_user)]) -> User:
        if not user.is_admin:
            raise HTTPException(403, "Admins only.")
        return user

    PageUser = Annotated[User, Depends(page_user)]
    ApiUser = Annotated[User, Depends(api_user)]

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = new_csrf_token()
            request.session["csrf"] = token
        return token

    def render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
        base = {
            "user": session_user(request),
            "csrf": csrf_token(request),
            "flash": request.session.pop("flash", None),
            "namespace": settings.namespace,
        }
        return templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)

    def parse_query(pairs: list[tuple[str, str]]) -> review_queue.QueueQuery:
        """Empty form fields mean "no filter"; anything else must be valid."""
        try:
            return review_queue.QueueQuery.model_validate({k: v for k, v in pairs if v != ""})
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc

    def decision_or_404(event_id: str) -> Decision:
        decision = db.get(event_id)
        if decision is None:
            raise HTTPException(404, f"No decision for event {event_id!r}.")
        return decision

    # --- sign in / out ------------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        return {"ok": bool(db.r.ping())}

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/queue", status_code=303)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/queue") -> Response:
        if session_user(request) is not None:
            return RedirectResponse(safe_next(next), status_code=303)
        return render(request, "login.html", {"next": safe_next(next), "error": None, "username": ""})

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=100)] = "",
        password: Annotated[str, Form(max_length=1000)] = "",
        next: Annotated[str, Form()] = "/queue",
        csrf_token_: Annotated[str, Form(alias=CSRF_FIELD)] = "",
    ) -> Response:
        check_post(request, csrf_token_)
        user = directory.authenticate(username.strip(), password)
        if user is None:
            ctx = {"next": safe_next(next), "error": "Wrong name or password.", "username": username}
            return render(request, "login.html", ctx, 401)
        request.session.clear()  # a new session on sign-in: nothing planted before it survives
        request.session.update(user=user.name, csrf=new_csrf_token())
        return RedirectResponse(safe_next(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf_token_: Annotated[str, Form(alias=CSRF_FIELD)] = "") -> Response:
        check_post(request, csrf_token_)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- pages --------------------------------------------------------------------------------------
    @app.get("/queue", response_class=HTMLResponse, include_in_schema=False)
    def queue_page(request: Request, user: PageUser) -> Response:
        query = parse_query(list(request.query_params.multi_items()))
        result = review_queue.page(db, query)
        return render(request, "queue.html", {"q": query, "page": result, "Sort": review_queue.Sort})

    @app.get("/find", include_in_schema=False)
    def find(user: PageUser, item_id: str = "") -> Response:
        decision = db.get_item(item_id.strip()) if item_id.strip() else None
        if decision is None:
            raise HTTPException(404, f"No decision for item {item_id!r}.")
        return RedirectResponse(f"/items/{quote(decision.event_id, safe='')}", status_code=303)

    @app.get("/items/{event_id}", response_class=HTMLResponse, include_in_schema=False)
    def item_page(request: Request, event_id: str, user: PageUser) -> Response:
        decision = decision_or_404(event_id)
        query = parse_query(list(request.query_params.multi_items()))
        prev_id, next_id = review_queue.neighbours(db, query, event_id)
        size = display_size(decision.image_size, crop_size_of(decision)) if decision.image_size else None
        try:
            heat_uri, heat_exact = heatmaps.checkpoint_uri(decision)
            heat_note = None if heat_exact else f"explained by the configured checkpoint {heat_uri}"
        except HeatmapUnavailable as exc:
            heat_note = str(exc)
        ctx = {
            "d": decision,
            "q": query,
            "prev_id": prev_id,
            "next_id": next_id,
            "size": size,
            "in_review": db.in_review(event_id),
            "history": history(decision, db.audit_of(event_id)),
            "heat_note": heat_note,
        }
        return render(request, "item.html", ctx)

    @app.post("/items/{event_id}/action", include_in_schema=False)
    def item_action(
        request: Request,
        event_id: str,
        user: PageUser,
        action: Annotated[str, Form()],
        note: Annotated[str, Form(max_length=2000)] = "",
        q: Annotated[str, Form(max_length=2000)] = "",
        csrf_token_: Annotated[str, Form(alias=CSRF_FIELD)] = "",
    ) -> Response:
        check_post(request, csrf_token_)
        if action not in (*ACTIONS, "skip"):
            raise HTTPException(400, f"Unknown action {action!r}.")
        before = decision_or_404(event_id)
        query = parse_query(parse_qsl(q))
        _, next_id = review_queue.neighbours(db, query, event_id)
        if action == "skip":
            request.session["flash"] = f"Skipped {before.item_id}."
        else:
            updated = db.override(event_id, ACTIONS[action], user.name, note=note)
            label = "Confirmed AI" if updated.verdict == Verdict.BLOCK else "Marked real"
            request.session["flash"] = f"{label}: {before.item_id} (was {before.verdict.value})."
        suffix = f"?{query.params()}" if query.params() else ""
        target = f"/items/{quote(next_id, safe='')}{suffix}" if next_id else f"/queue{suffix}"
        return RedirectResponse(target, status_code=303)

    @app.get("/items/{event_id}/image", include_in_schema=False)
    def item_image(event_id: str, user: PageUser) -> Response:
        decision = decision_or_404(event_id)
        try:
            body, media_type = encode(images.for_display(decision))
        except ModerationError as exc:
            raise HTTPException(502, f"Image unavailable: {exc.reason.value}: {exc.detail}") from exc
        return Response(body, media_type=media_type, headers={"Cache-Control": "private, max-age=600"})

    @app.get("/items/{event_id}/thumb", include_in_schema=False)
    def item_thumb(event_id: str, user: PageUser) -> Response:
        decision = decision_or_404(event_id)
        try:
            body = thumbs.get_or_make(event_id, lambda: thumbnail(images.decoded(decision.image_uri)))
        except ModerationError as exc:
            raise HTTPException(502, f"Image unavailable: {exc.reason.value}") from exc
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})

    @app.get("/items/{event_id}/crop", include_in_schema=False)
    def item_crop(event_id: str, user: PageUser, n: int | None = None) -> Response:
        decision = decision_or_404(event_id)
        index = decision.deciding_crop if n is None else n
        if index is None or not 0 <= index < len(decision.crops):
            raise HTTPException(404, "No such crop.")
        try:
            body, media_type = encode(images.crop(decision, decision.crops[index].box))
        except ModerationError as exc:
            raise HTTPException(502, f"Image unavailable: {exc.reason.value}") from exc
        return Response(body, media_type=media_type, headers={"Cache-Control": "private, max-age=600"})

    @app.get("/items/{event_id}/heatmap", include_in_schema=False)
    def item_heatmap(event_id: str, user: PageUser) -> Response:
        return heatmap_response(decision_or_404(event_id))

    def heatmap_response(decision: Decision) -> Response:
        try:
            heat = heatmaps.for_decision(decision)
        except HeatmapUnavailable as exc:
            raise HTTPException(404, f"No heatmap: {exc}") from exc
        except ModerationError as exc:
            raise HTTPException(502, f"Image unavailable: {exc.reason.value}") from exc
        headers = {
            "Cache-Control": "private, max-age=600",
            "X-Heatmap-Model-Version": heat.version,
            "X-Heatmap-Exact": "1" if heat.exact else "0",
            "X-Heatmap-Score": f"{heat.score:.6f}",
        }
        return Response(heat.png, media_type="image/png", headers=headers)

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin_page(
        request: Request, user: Annotated[User, Depends(admin_user)], before: str = "+"
    ) -> Response:
        entries = db.recent_overrides(100, before)
        ctx = {
            "users": directory.all(),
            "entries": entries,
            "older": entries[-1][0] if len(entries) == 100 else None,
            "waiting": db.review_count(),
            "total_overrides": int(db.r.xlen(db.keys.overrides)),
        }
        return render(request, "admin.html", ctx)

    # --- JSON API -----------------------------------------------------------------------------------
    @app.get("/api/me", tags=["api"])
    def api_me(user: ApiUser) -> dict[str, str]:
        return {"name": user.name, "role": user.role.value}

    @app.get("/api/queue", tags=["api"])
    def api_queue(request: Request, user: ApiUser) -> dict[str, Any]:
        query = parse_query(list(request.query_params.multi_items()))
        result = review_queue.page(db, query)
        return {
            "total": result.total,
            "waiting": result.waiting,
            "offset": query.offset,
            "limit": query.limit,
            "items": [item_json(d) for d in result.items],
        }

    @app.get("/api/items/{event_id}", tags=["api"])
    def api_item(event_id: str, user: ApiUser) -> dict[str, Any]:
        decision = decision_or_404(event_id)
        return {
            **item_json(decision),
            "in_review": db.in_review(event_id),
            "history": history(decision, db.audit_of(event_id)),
        }

    @app.post("/api/items/{event_id}/override", tags=["api"])
    def api_override(event_id: str, body: OverrideRequest, user: ApiUser) -> dict[str, Any]:
        if body.verdict not in ACTIONS.values():
            raise HTTPException(422, "verdict must be block (confirm AI) or allow (mark real).")
        before = decision_or_404(event_id)
        updated = db.override(event_id, body.verdict, user.name, note=body.note)
        return {**item_json(updated), "previous_verdict": before.verdict.value}

    @app.get("/api/items/{event_id}/heatmap", tags=["api"])
    def api_heatmap(event_id: str, user: ApiUser) -> Response:
        return heatmap_response(decision_or_404(event_id))

    @app.get("/api/audit", tags=["api"])
    def api_audit(user: Annotated[User, Depends(api_admin)], count: int = 100, before: str = "+") -> Any:
        return [{"id": i, **f} for i, f in db.recent_overrides(max(1, min(count, 1000)), before)]

    return app


def item_json(d: Decision) -> dict[str, Any]:
    return {"decision": d.model_dump(mode="json"), "source": image_source(d)}


def history(decision: Decision, audit: list[dict[str, str]]) -> list[dict[str, str]]:
    """The model's decision, then every override, oldest first."""
    first = audit[0] if audit else None
    model_verdict = first["previous_verdict"] if first else decision.verdict.value
    model_at = first.get("previous_decided_at", "") if first else decision.decided_at.isoformat()
    score = "" if decision.ai_score is None else f"{decision.ai_score:.3f}"
    out = [
        {
            "at": model_at,
            "who": f"model {decision.model_version or '?'}",
            "verdict": model_verdict,
            "previous": "",
            "note": f"ai_score {score}" if score else (decision.detail or ""),
        }
    ]
    for e in audit:
        out.append(
            {
                "at": e.get("at", ""),
                "who": e.get("moderator", ""),
                "verdict": e.get("verdict", ""),
                "previous": e.get("previous_verdict", ""),
                "note": e.get("note", ""),
            }
        )
    return out


def _parse_dt(value: datetime | str) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        dt = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _ts(value: datetime | str) -> str:
    dt = _parse_dt(value)
    return "" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: datetime | str) -> str:
    dt = _parse_dt(value)
    if dt is None:
        return ""
    s = max(0, int((datetime.now(UTC) - dt).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"
