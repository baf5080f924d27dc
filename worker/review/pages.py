"""The server-rendered pages: sign-in, queue, item, actions, images, admin."""

from __future__ import annotations

import math
from typing import Annotated
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.delivery.store import OverrideConflict
from worker.errors import ModerationError
from worker.records import Verdict
from worker.review import queue as review_queue
from worker.review.appeals import blocked_by_model
from worker.review.auth import CSRF_FIELD, User, new_csrf_token, safe_next
from worker.review.context import Ctx
from worker.review.guards import PageAdmin, PageUser, check_post, session_user
from worker.review.heatmap import HeatmapUnavailable
from worker.review.media import crop_size_of, display_size, encode, thumbnail
from worker.review.queue import QueueQuery
from worker.review.views import (
    IMAGE_CACHE,
    describe_conflict,
    heatmap_response,
    history,
    parse_query,
    render,
    stream_id,
)

router = APIRouter(include_in_schema=False)

ACTIONS = {"confirm_ai": Verdict.BLOCK, "mark_real": Verdict.ALLOW}
Csrf = Annotated[str, Form(alias=CSRF_FIELD)]


@router.get("/healthz")
def healthz(review: Ctx) -> dict[str, bool]:
    return {"ok": bool(review.store.r.ping())}


@router.get("/metrics")
def metrics(review: Ctx) -> Response:
    """The review backlog for Prometheus (counts and ages only, so it needs no sign-in, like the workers')."""
    return Response(generate_latest(review.metrics), media_type=CONTENT_TYPE_LATEST)


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
    result = review_queue.page(review.store, query, user.name)
    ctx = {"q": query, "page": result, "Sort": review_queue.Sort, "batch": review.settings.review_claim_batch}
    return render(request, review, "queue.html", ctx)


@router.post("/queue/claim")
def claim_next(
    request: Request,
    review: Ctx,
    user: PageUser,
    q: Annotated[str, Form(max_length=2000)] = "",
    csrf: Csrf = "",
) -> Response:
    """Hold the next items of the moderator's current order (others stop seeing them), open the first."""
    check_post(request, review, csrf)
    query = parse_query(parse_qsl(q))
    settings = review.settings
    got = review_queue.claim_next(
        review.store, query, user.name, settings.review_claim_batch, settings.review_claim_lease_s
    )
    suffix = f"?{query.params(offset=None)}" if query.params(offset=None) else ""
    if not got:
        request.session["flash"] = "Nothing left to claim: every waiting item is taken or done."
        return RedirectResponse(f"/queue{suffix}", status_code=303)
    minutes = round(settings.review_claim_lease_s / 60)
    request.session["flash"] = f"You hold {len(got)} item{'' if len(got) == 1 else 's'} for {minutes} min."
    return RedirectResponse(f"/items/{quote(got[0], safe='')}{suffix}", status_code=303)


@router.post("/queue/bulk")
def bulk_action(
    request: Request,
    review: Ctx,
    user: PageUser,
    action: Annotated[str, Form()],
    items: Annotated[list[str], Form(max_length=500)],
    q: Annotated[str, Form(max_length=2000)] = "",
    csrf: Csrf = "",
) -> Response:
    """One verdict (or a release) for the rows ticked on a page of the queue; each row's checkbox carries
    ``event_id@version``, so every override is still checked against what the moderator saw."""
    check_post(request, review, csrf)
    if action not in (*ACTIONS, "skip"):
        raise HTTPException(400, f"Unknown action {action!r}.")
    parsed: list[tuple[str, int]] = []
    for item in items[:500]:
        event_id, at, number = item.rpartition("@")
        if not at or not number.isdigit():
            raise HTTPException(422, f"items: {item!r} is not event_id@version")
        parsed.append((event_id, int(number)))
    store = review.store
    saved, refused = 0, []
    for event_id, seen in parsed:
        if action == "skip":
            saved += store.release([event_id], user.name)
            continue
        try:
            review.override(
                event_id,
                ACTIONS[action],
                user.name,
                expected_version=seen,
            )
            saved += 1
        except KeyError:
            refused.append(f"{event_id}: no such decision")
        except OverrideConflict as exc:
            refused.append(f"{event_id}: {describe_conflict(exc)}")
    label = {"confirm_ai": "Confirmed AI", "mark_real": "Marked real", "skip": "Released"}[action]
    flash = f"{label}: {saved} item{'' if saved == 1 else 's'}."
    if refused:
        flash += f" {len(refused)} not saved: " + " ".join(refused)
    request.session["flash"] = flash
    query = parse_query(parse_qsl(q))
    suffix = f"?{query.params()}" if query.params() else ""
    return RedirectResponse(f"/queue{suffix}", status_code=303)


@router.get("/appeals", response_class=HTMLResponse)
def appeals_page(
    request: Request, review: Ctx, user: PageUser, before: str = "+", search: str = ""
) -> Response:
    """Items the model blocked by itself, newest first: where an appeal against a block is answered."""
    result = blocked_by_model(review.store, stream_id(before), search=search.strip()[:200] or None)
    return render(request, review, "appeals.html", {"page": result, "search": search, "before": before})


@router.get("/find")
def find(review: Ctx, user: PageUser, item_id: str = "") -> Response:
    decision = review.store.get_item(item_id.strip()) if item_id.strip() else None
    if decision is None:
        raise HTTPException(404, f"No decision for item {item_id!r}.")
    return RedirectResponse(f"/items/{quote(decision.event_id, safe='')}", status_code=303)


def item_context(review: Ctx, user: User, event_id: str, query: QueueQuery) -> dict[str, object]:
    """Everything the item page shows; opening a queued item claims it for the viewer if it is free."""
    store = review.store
    in_review = store.in_review(event_id)
    if in_review:
        store.claim([event_id], user.name, 1, review.settings.review_claim_lease_s)
    decision, version = store.get_versioned(event_id)
    if decision is None:
        raise HTTPException(404, f"No decision for event {event_id!r}.")
    prev_id, next_id = review_queue.neighbours(store, query, event_id, user.name)
    size = display_size(decision.image_size, crop_size_of(decision)) if decision.image_size else None
    try:
        heat_uri, heat_exact = review.heatmaps.checkpoint_uri(decision)
        heat_note = None if heat_exact else f"explained by the configured checkpoint {heat_uri}"
    except HeatmapUnavailable as exc:
        heat_note = str(exc)
    claim = store.claim_of(event_id) if in_review else None
    first = store.second_reviews().get(event_id) if in_review else None
    return {
        "d": decision,
        "version": version,
        "q": query,
        "prev_id": prev_id,
        "next_id": next_id,
        "size": size,
        "in_review": in_review,
        "claim": claim,
        "held_by_other": claim is not None and claim.moderator != user.name,
        "first_moderator": first,
        "history": history(decision, store.audit_of(event_id)),
        "heat_note": heat_note,
        "conflict": None,
    }


@router.get("/items/{event_id}", response_class=HTMLResponse)
def item_page(request: Request, event_id: str, review: Ctx, user: PageUser) -> Response:
    query = parse_query(list(request.query_params.multi_items()))
    return render(request, review, "item.html", item_context(review, user, event_id, query))


@router.post("/items/{event_id}/action")
def item_action(
    request: Request,
    event_id: str,
    review: Ctx,
    user: PageUser,
    action: Annotated[str, Form()],
    note: Annotated[str, Form(max_length=2000)] = "",
    q: Annotated[str, Form(max_length=2000)] = "",
    version: Annotated[int | None, Form(ge=0)] = None,
    csrf: Csrf = "",
) -> Response:
    """Confirm AI, mark real or skip, then on to the next item of the moderator's current order.

    The form carries the decision version it was rendered with: if the decision changed since, nothing is
    written and the page comes back with a 409 saying who changed it to what, and when.
    """
    check_post(request, review, csrf)
    if action not in (*ACTIONS, "skip"):
        raise HTTPException(400, f"Unknown action {action!r}.")
    store, settings = review.store, review.settings
    before = review.decision_or_404(event_id)
    query = parse_query(parse_qsl(q))
    order = [r.event_id for r in review_queue.ordered(store, query, user.name)[0]]
    if action == "skip":
        store.release([event_id], user.name)
        request.session["flash"] = f"Skipped {before.item_id}."
    else:
        try:
            updated = review.override(
                event_id,
                ACTIONS[action],
                user.name,
                note=note,
                expected_version=version,
            )
        except OverrideConflict as exc:
            ctx = item_context(review, user, event_id, query)
            ctx["conflict"] = describe_conflict(exc)
            return render(request, review, "item.html", ctx, 409)
        label = "Confirmed AI" if updated.verdict == Verdict.BLOCK else "Marked real"
        request.session["flash"] = f"{label}: {before.item_id} (was {before.verdict.value})."
    got = store.claim(review_queue.following(order, event_id), user.name, 1, settings.review_claim_lease_s)
    suffix = f"?{query.params()}" if query.params() else ""
    target = f"/items/{quote(got[0], safe='')}{suffix}" if got else f"/queue{suffix}"
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
