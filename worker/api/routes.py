"""The routes: submit events, read decisions back, score one event with a bounded wait."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Body, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.api.context import APIError, Ctx, Reader, Submitter
from worker.api.schemas import BUSY, ERRORS, NOT_FOUND, Accepted, Health, Pending
from worker.delivery.webhook import callback_refusal
from worker.records import Decision, Event

router = APIRouter()
v1 = APIRouter(prefix="/v1", responses=ERRORS)


def _checked(api: Ctx, events: list[Event]) -> list[Event]:
    if len(events) > api.settings.api_max_events:
        raise APIError(413, "too_many_events", f"at most {api.settings.api_max_events} events per request")
    for i, e in enumerate(events):
        if e.callback_url is not None:
            why = callback_refusal(api.settings, e.callback_url)
            if why is not None:
                raise APIError(
                    422, "callback_refused", f"event {i} ({e.event_id}): callback_url refused: {why}"
                )
    api.check_backlog(len(events))
    return events


@v1.post("/events", status_code=202, responses=BUSY)
def submit_events(
    api: Ctx,
    token: Submitter,
    body: Annotated[Event | list[Event], Body(description="One event or a list of them.")],
) -> Accepted:
    """Queue events for scoring; each is decided once. Read decisions back by event id, or get callbacks."""
    events = _checked(api, body if isinstance(body, list) else [body])
    if events:
        api.submit(events)
        api.metrics.events.inc(len(events))
    return Accepted(event_ids=[e.event_id for e in events])


@v1.get("/decisions/{event_id:path}", responses=NOT_FOUND)
def get_decision(event_id: str, api: Ctx, token: Reader) -> Decision:
    """An event's decision (after a moderator's override: the final verdict, ``source`` names who)."""
    decision = api.store.get(event_id)
    if decision is None:
        raise APIError(404, "not_found", f"no decision for event {event_id!r} (yet)")
    return decision


@v1.get("/items/{item_id:path}", responses=NOT_FOUND)
def get_item(item_id: str, api: Ctx, token: Reader) -> Decision:
    """The latest decision about an item (the last event submitted for it, or its override)."""
    decision = api.store.get_item(item_id)
    if decision is None:
        raise APIError(404, "not_found", f"no decision for item {item_id!r} (yet)")
    return decision


@v1.post("/score", responses={**BUSY, 202: {"model": Pending, "description": "Not decided in time."}})
async def score(
    api: Ctx,
    token: Submitter,
    event: Event,
    timeout: Annotated[
        float | None, Query(gt=0, description="Seconds to wait at most (capped by the server's limit).")
    ] = None,
) -> Response:
    """Submit one event and wait for its decision (200); if it takes longer than the wait, 202 with the
    event id to read it later. For low volumes: a pipeline at scale submits and takes callbacks."""
    await run_in_threadpool(_checked, api, [event])
    await run_in_threadpool(api.submit, [event])
    api.metrics.events.inc()
    wait = min(timeout or api.settings.api_score_timeout_s, api.settings.api_score_timeout_s)
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        decision = await run_in_threadpool(api.store.get, event.event_id)
        if decision is not None:
            return Response(decision.to_json(), media_type="application/json")
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.2)
    url = f"/v1/decisions/{quote(event.event_id, safe='')}"  # headers are latin-1; ids may not be
    body = Pending(event_id=event.event_id, decision_url=url)
    return JSONResponse(body.model_dump(), 202, headers={"Location": url})


@router.get("/healthz")
def healthz(api: Ctx) -> JSONResponse:
    """Liveness and Redis reachability (no token needed)."""
    try:
        ok = bool(api.store.r.ping())
    except Exception:
        ok = False
    body = Health(status="ok" if ok else "unavailable", redis=ok)
    return JSONResponse(body.model_dump(), 200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(api: Ctx) -> Response:
    return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(v1)
