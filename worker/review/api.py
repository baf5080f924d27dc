"""The JSON API behind the page, for other tools: the same queue, items and overrides.

Bearer tokens (``moderation review add-user NAME --token``) or the page's session plus ``X-CSRF-Token``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from worker.records import Verdict
from worker.review import queue as review_queue
from worker.review.context import Ctx
from worker.review.guards import ApiAdmin, ApiUser
from worker.review.views import heatmap_response, history, item_json, parse_query, stream_id

router = APIRouter(prefix="/api", tags=["api"])

OVERRIDE_VERDICTS = (Verdict.BLOCK, Verdict.ALLOW)


class OverrideRequest(BaseModel):
    verdict: Verdict = Field(description="block (confirm AI) or allow (mark real).")
    note: str = Field("", max_length=2000)


@router.get("/me")
def me(user: ApiUser) -> dict[str, str]:
    return {"name": user.name, "role": user.role.value}


@router.get("/queue")
def queue(request: Request, review: Ctx, user: ApiUser) -> dict[str, Any]:
    """Waiting items; parameters as on the page: sort, source, model_version, since, until, offset, limit."""
    query = parse_query(list(request.query_params.multi_items()))
    result = review_queue.page(review.store, query)
    return {
        "total": result.total,
        "waiting": result.waiting,
        "offset": query.offset,
        "limit": query.limit,
        "items": [item_json(d) for d in result.items],
    }


@router.get("/items/{event_id}")
def item(event_id: str, review: Ctx, user: ApiUser) -> dict[str, Any]:
    decision = review.decision_or_404(event_id)
    return {
        **item_json(decision),
        "in_review": review.store.in_review(event_id),
        "history": history(decision, review.store.audit_of(event_id)),
    }


@router.post("/items/{event_id}/override")
def override(event_id: str, body: OverrideRequest, review: Ctx, user: ApiUser) -> dict[str, Any]:
    if body.verdict not in OVERRIDE_VERDICTS:
        raise HTTPException(422, "verdict must be block (confirm AI) or allow (mark real).")
    before = review.decision_or_404(event_id)
    updated = review.store.override(event_id, body.verdict, user.name, note=body.note)
    return {**item_json(updated), "previous_verdict": before.verdict.value}


@router.get("/items/{event_id}/heatmap")
def heatmap(event_id: str, review: Ctx, user: ApiUser) -> Response:
    return heatmap_response(review, review.decision_or_404(event_id))


@router.get("/audit")
def audit(review: Ctx, user: ApiAdmin, count: int = 100, before: str = "+") -> list[dict[str, str]]:
    """The override audit log, newest first; page with ``before=<id of the last entry>``. Admins only."""
    return [
        {"id": i, **f} for i, f in review.store.recent_overrides(max(1, min(count, 1000)), stream_id(before))
    ]
