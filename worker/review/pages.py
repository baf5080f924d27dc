"""The server-rendered pages: sign-in, queue, item, actions, images, admin."""

from __future__ import annotations

import math
from typing import Annotated
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from worker.errors import ModerationError
from worker.records import Verdict
from worker.review import queue as review_queue
from worker.review.auth import CSRF_FIELD, new_csrf_token, safe_next
from worker.review.context import Ctx
from worker.review.guards import PageAdmin, PageUser, check_post, session_user
from worker.review.heatmap import HeatmapUnavailable
from worker.review.media import crop_size_of, display_size, encode, thumbnail
from worker.review.views import IMAGE_CACHE, heatmap_response, history, parse_query, render, stream_id

router = APIRouter(include_in_schema=False)

ACTIONS = {"confirm_ai": Verdict.BLOCK, "mark_real": Verdict.ALLOW}
Csrf = Annotated[str, Form(alias=CSRF_FIELD)]


@router.get("/healthz")
def healthz(review: Ctx) -> dict[str, bool]:
    return {"ok": bool(review.store.r.ping())}


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/queue", status_code=303)


# --- sign in / out ----------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, review: Ctx, next: str = "/queue") -> Response:
    if session_user(request, review) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, review, "login.html", {"next": safe_next(next), "error": None, "username": ""})


@router.post("/login")
def login(
    request: Request,
    review: Ctx,
    username: Annotated[str, Form(max_length=100)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    next: Annotated[str, Form()] = "/queue",
    csrf: Csrf = "",
) -> Response:
    check_post(request, review, csrf)
    # The client address is uvicorn's (X-Forwarded-For from the proxies in --forwarded-allow-ips).
    address = request.client.host if request.client else "unknown"
    name = username.strip()
    ctx = {"next": safe_next(next), "error": "Too many attempts: try again later.", "username": username}
    wait = review.throttle.attempt(address, name)
    if wait > 0:
        ctx["error"] = f"Too many attempts: try again in {math.ceil(wait)} s."
        refused = render(request, review, "login.html", ctx, 429)
        refused.headers["Retry-After"] = str(math.ceil(wait))
        return refused
    if not review.throttle.slots.acquire(timeout=0.5):  # a flood must not hold every server thread
        busy = render(request, review, "login.html", ctx, 429)
        busy.headers["Retry-After"] = "1"
        return busy
    try:
        user = review.directory.authenticate(name, password)
    finally:
        review.throttle.slots.release()
    if user is None:
        ctx["error"] = "Wrong name or password."
        return render(request, review, "login.html", ctx, 401)
    review.throttle.succeeded(address, name)
    review.sessions.revoke(request.session.get("sid"))
    request.session.clear()  # a new session on sign-in: nothing planted before it survives
    request.session.update(user=user.name, sid=review.sessions.create(user.name), csrf=new_csrf_token())
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, review: Ctx, csrf: Csrf = "") -> Response:
    check_post(request, review, csrf)
    review.sessions.revoke(request.session.get("sid"))  # a copy of the cookie stops working too
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --- queue and items --------------------------------------------------------------------------------
@router.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, review: Ctx, user: PageUser) -> Response:
    query = parse_query(list(request.query_params.multi_items()))
    result = review_queue.page(review.store, query)
    return render(request, review, "queue.html", {"q": query, "page": result, "Sort": review_queue.Sort})


@router.get("/find")
def find(review: Ctx, user: PageUser, item_id: str = "") -> Response:
    decision = review.store.get_item(item_id.strip()) if item_id.strip() else None
    if decision is None:
        raise HTTPException(404, f"No decision for item {item_id!r}.")
    return RedirectResponse(f"/items/{quote(decision.event_id, safe='')}", status_code=303)


@router.get("/items/{event_id}", response_class=HTMLResponse)
def item_page(request: Request, event_id: str, review: Ctx, user: PageUser) -> Response:
    decision = review.decision_or_404(event_id)
    query = parse_query(list(request.query_params.multi_items()))
    prev_id, next_id = review_queue.neighbours(review.store, query, event_id)
    size = display_size(decision.image_size, crop_size_of(decision)) if decision.image_size else None
    try:
        heat_uri, heat_exact = review.heatmaps.checkpoint_uri(decision)
        heat_note = None if heat_exact else f"explained by the configured checkpoint {heat_uri}"
    except HeatmapUnavailable as exc:
        heat_note = str(exc)
    ctx = {
        "d": decision,
        "q": query,
        "prev_id": prev_id,
        "next_id": next_id,
        "size": size,
        "in_review": review.store.in_review(event_id),
        "history": history(decision, review.store.audit_of(event_id)),
        "heat_note": heat_note,
    }
    return render(request, review, "item.html", ctx)


@router.post("/items/{event_id}/action")
def item_action(
    request: Request,
    event_id: str,
    review: Ctx,
    user: PageUser,
    action: Annotated[str, Form()],
    note: Annotated[str, Form(max_length=2000)] = "",
    q: Annotated[str, Form(max_length=2000)] = "",
    csrf: Csrf = "",
) -> Response:
    """Confirm AI, mark real or skip, then on to the next item of the moderator's current order."""
    check_post(request, review, csrf)
    if action not in (*ACTIONS, "skip"):
        raise HTTPException(400, f"Unknown action {action!r}.")
    before = review.decision_or_404(event_id)
    query = parse_query(parse_qsl(q))
    _, next_id = review_queue.neighbours(review.store, query, event_id)
    if action == "skip":
        request.session["flash"] = f"Skipped {before.item_id}."
    else:
        updated = review.store.override(event_id, ACTIONS[action], user.name, note=note)
        label = "Confirmed AI" if updated.verdict == Verdict.BLOCK else "Marked real"
        request.session["flash"] = f"{label}: {before.item_id} (was {before.verdict.value})."
    suffix = f"?{query.params()}" if query.params() else ""
    target = f"/items/{quote(next_id, safe='')}{suffix}" if next_id else f"/queue{suffix}"
    return RedirectResponse(target, status_code=303)


@router.get("/items/{event_id}/image")
def item_image(event_id: str, review: Ctx, user: PageUser) -> Response:
    decision = review.decision_or_404(event_id)
    try:
        body, media_type = encode(review.images.for_display(decision))
    except ModerationError as exc:
        raise HTTPException(502, f"Image unavailable: {exc.reason.value}: {exc.detail}") from exc
    return Response(body, media_type=media_type, headers={"Cache-Control": IMAGE_CACHE})


@router.get("/items/{event_id}/thumb")
def item_thumb(event_id: str, review: Ctx, user: PageUser) -> Response:
    decision = review.decision_or_404(event_id)
    try:
        body = review.thumbs.get_or_make(
            event_id, lambda: thumbnail(review.images.decoded(decision.image_uri))
        )
    except ModerationError as exc:
        raise HTTPException(502, f"Image unavailable: {exc.reason.value}") from exc
    return Response(body, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})


@router.get("/items/{event_id}/crop")
def item_crop(event_id: str, review: Ctx, user: PageUser, n: int | None = None) -> Response:
    """A crop at native resolution (the deciding one unless ``n`` says otherwise)."""
    decision = review.decision_or_404(event_id)
    index = decision.deciding_crop if n is None else n
    if index is None or not 0 <= index < len(decision.crops):
        raise HTTPException(404, "No such crop.")
    try:
        body, media_type = encode(review.images.crop(decision, decision.crops[index].box))
    except ModerationError as exc:
        raise HTTPException(502, f"Image unavailable: {exc.reason.value}") from exc
    return Response(body, media_type=media_type, headers={"Cache-Control": IMAGE_CACHE})


@router.get("/items/{event_id}/heatmap")
def item_heatmap(event_id: str, review: Ctx, user: PageUser) -> Response:
    return heatmap_response(review, review.decision_or_404(event_id))


# --- admin ------------------------------------------------------------------------------------------
@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, review: Ctx, user: PageAdmin, before: str = "+") -> Response:
    store = review.store
    entries = store.recent_overrides(100, stream_id(before))
    ctx = {
        "users": review.directory.all(),
        "entries": entries,
        "older": entries[-1][0] if len(entries) == 100 else None,
        "waiting": store.review_count(),
        "total_overrides": int(store.r.xlen(store.keys.overrides)),
    }
    return render(request, review, "admin.html", ctx)
