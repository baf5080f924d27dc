"""The JSON API behind the page, for other tools: the same queue, items and overrides.

Bearer tokens (``moderation review add-user NAME --token``) or the page's session plus ``X-CSRF-Token``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from worker.delivery.store import OverrideConflict
from worker.records import Verdict
from worker.review import queue as review_queue
from worker.review.context import Ctx
from worker.review.guards import ApiAdmin, ApiUser
from worker.review.views import conflict_json, heatmap_response, history, item_json, parse_query, stream_id

router = APIRouter(prefix="/api", tags=["api"])

OVERRIDE_VERDICTS = (Verdict.BLOCK, Verdict.ALLOW)


class OverrideRequest(BaseModel):
    verdict: Verdict = Field(description="block (confirm AI) or allow (mark real).")
    note: str = Field("", max_length=2000)
    version: int | None = Field(
        None,
        ge=0,
        description="The decision version this verdict was made on (from GET /api/items/{id}); a decision "
        "that changed since is refused with 409. Omitted: applies to the current version.",
    )


class ClaimRequest(BaseModel):
    n: int = Field(10, ge=1, le=200, description="Hold this many items (those already held count).")


@router.get("/me")
def me(user: ApiUser) -> dict[str, str]:
    return {"name": user.name, "role": user.role.value}


@router.get("/queue")
def queue(request: Request, review: Ctx, user: ApiUser) -> dict[str, Any]:
    """Waiting items; parameters as on the page: sort, source, model_version, since, until, offset, limit."""
    query = parse_query(list(request.query_params.multi_items()))
    result = review_queue.page(review.store, query, user.name)
    return {
        "total": result.total,
        "waiting": result.waiting,
        "held_by_others": result.held_by_others,
        "offset": query.offset,
        "limit": query.limit,
        "items": [{**item_json(d), "claimed_until": _iso(result.mine.get(d.event_id))} for d in result.items],
    }


@router.post("/claims")
def claim(request: Request, body: ClaimRequest, review: Ctx, user: ApiUser) -> dict[str, Any]:
    """Hold the next ``n`` items of the queue (query parameters as for /api/queue); others stop seeing them
    until they are decided, released or the lease runs out."""
    query = parse_query(list(request.query_params.multi_items()))
    lease = review.settings.review_claim_lease_s
    got = review_queue.claim_next(review.store, query, user.name, body.n, lease)
    claims = review.store.claims()
    held = [{"event_id": e, "until": _iso(claims[e].until if e in claims else None)} for e in got]
    return {"claimed": held}


@router.delete("/claims/{event_id}")
def release(event_id: str, review: Ctx, user: ApiUser) -> dict[str, bool]:
    """Give an item back to the queue (a skip)."""
    return {"released": bool(review.store.release([event_id], user.name))}


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


@router.get("/items/{event_id}")
def item(event_id: str, review: Ctx, user: ApiUser) -> dict[str, Any]:
    decision, version = review.store.get_versioned(event_id)
    if decision is None:
        raise HTTPException(404, f"No decision for event {event_id!r}.")
    claim = review.store.claim_of(event_id)
    return {
        **item_json(decision),
        "version": version,
        "in_review": review.store.in_review(event_id),
        "claimed_by": claim.moderator if claim else None,
        "claimed_until": _iso(claim.until if claim else None),
        "history": history(decision, review.store.audit_of(event_id)),
    }


@router.post(
    "/items/{event_id}/override",
    responses={409: {"description": "The decision changed since `version`, or another moderator holds it."}},
)
def override(event_id: str, body: OverrideRequest, review: Ctx, user: ApiUser) -> Any:
    if body.verdict not in OVERRIDE_VERDICTS:
        raise HTTPException(422, "verdict must be block (confirm AI) or allow (mark real).")
    before = review.decision_or_404(event_id)
    try:
        updated = review.override(
            event_id,
            body.verdict,
            user.name,
            note=body.note,
            expected_version=body.version,
        )
    except OverrideConflict as exc:
        return JSONResponse(conflict_json(exc), 409)
    return {
        **item_json(updated),
        "previous_verdict": before.verdict.value,
        "version": review.store.version_of(event_id),
    }


@router.get("/items/{event_id}/heatmap")
def heatmap(event_id: str, review: Ctx, user: ApiUser) -> Response:
    return heatmap_response(review, review.decision_or_404(event_id))


@router.get("/audit")
def audit(review: Ctx, user: ApiAdmin, count: int = 100, before: str = "+") -> list[dict[str, str]]:
    """The override audit log, newest first; page with ``before=<id of the last entry>``. Admins only."""
    return [
        {"id": i, **f} for i, f in review.store.recent_overrides(max(1, min(count, 1000)), stream_id(before))
    ]
