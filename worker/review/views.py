"""Presentation shared by the pages and the API: templates, the item history, query parsing, formatting."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from worker.delivery.store import ClaimedByOther, OverrideConflict, SecondReviewPending, StaleDecision
from worker.errors import ModerationError
from worker.records import Decision
from worker.review.auth import CSRF_FIELD
from worker.review.context import Review
from worker.review.guards import csrf_token, session_user
from worker.review.heatmap import HeatmapUnavailable
from worker.review.media import image_source
from worker.review.queue import QueueQuery

IMAGE_CACHE = "private, max-age=600"


def urlencode_all(value: Any) -> str:
    """Jinja's ``urlencode`` keeps ``/``, so an id like ``../admin`` became another page's link; ids are one
    path segment: escape everything (mappings and pairs still make query strings, as Jinja's filter does)."""
    from jinja2.filters import do_urlencode
    from markupsafe import Markup

    if isinstance(value, str | Markup):
        return quote(str(value), safe="")
    return do_urlencode(value)


def make_templates(directory: Path) -> Jinja2Templates:
    templates = Jinja2Templates(directory=directory)
    templates.env.filters.update(ts=fmt_time, ago=fmt_ago, age_class=age_class, urlencode=urlencode_all)
    templates.env.globals.update(source_of=image_source, CSRF_FIELD=CSRF_FIELD)
    return templates


def render(
    request: Request, review: Review, name: str, ctx: dict[str, Any], status: int = 200
) -> HTMLResponse:
    base = {
        "user": session_user(request, review),
        "csrf": csrf_token(request),
        "flash": request.session.pop("flash", None),
        "namespace": review.settings.namespace,
        "sla": review.settings.review_sla_s,
    }
    return review.templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)


def parse_query(pairs: list[tuple[str, str]]) -> QueueQuery:
    """Empty form fields mean "no filter"; anything else must be valid (else a 422 naming the field)."""
    try:
        return QueueQuery.model_validate({k: v for k, v in pairs if v != ""})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def stream_id(before: str) -> str:
    """A Redis stream id (or ``+``) from a query parameter, else a 422 rather than a Redis error."""
    if before == "+" or re.fullmatch(r"\d{1,20}-\d{1,20}", before):
        return before
    raise HTTPException(422, "before must be a stream id like 1764230400000-0")


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


ACTION_WORDS = {"block": "confirmed it AI", "allow": "marked it real", "review": "sent it back to review"}


def describe_conflict(exc: OverrideConflict) -> str:
    """Why an override was not saved, in the moderator's words: who changed what, and when."""
    if isinstance(exc, StaleDecision):
        last, now = exc.last, exc.current.verdict.value
        if last:
            verdict = last.get("verdict", "")
            what = (
                f"{last.get('moderator', 'someone')} {ACTION_WORDS.get(verdict, verdict)} "
                f"({last.get('previous_verdict', '?')} → {verdict}) at {fmt_time(last.get('at', ''))}"
            )
        else:
            what = "its history was reset"
        return (
            f"Not saved: this decision changed after you opened it. {what}. It is now {now} "
            f"(version {exc.version}; your page showed version {exc.expected}). Look again, then decide."
        )
    if isinstance(exc, ClaimedByOther):
        return f"Not saved: {exc.moderator} is reviewing this item (claimed until {fmt_time(exc.until)})."
    if isinstance(exc, SecondReviewPending):
        return "Not saved: you gave this item its first verdict; a second moderator reviews it."
    return f"Not saved: {exc}."


def conflict_json(exc: OverrideConflict) -> dict[str, Any]:
    """The API's 409 body: the sentence, plus what the decision is now for a tool to retry on."""
    body: dict[str, Any] = {"detail": describe_conflict(exc), "event_id": exc.event_id}
    if isinstance(exc, StaleDecision):
        body.update(version=exc.version, expected_version=exc.expected, changed_by=exc.last)
        body["decision"] = exc.current.model_dump(mode="json")
    elif isinstance(exc, ClaimedByOther):
        body.update(claimed_by=exc.moderator, claimed_until=exc.until.isoformat())
    elif isinstance(exc, SecondReviewPending):
        body.update(first_moderator=exc.first)
    return body


def heatmap_response(review: Review, decision: Decision) -> Response:
    try:
        heat = review.heatmaps.for_decision(decision)
    except HeatmapUnavailable as exc:
        raise HTTPException(404, f"No heatmap: {exc}") from exc
    except ModerationError as exc:
        raise HTTPException(502, f"Image unavailable: {exc.reason.value}") from exc
    headers = {
        "Cache-Control": IMAGE_CACHE,
        "X-Heatmap-Model-Version": heat.version,
        "X-Heatmap-Exact": "1" if heat.exact else "0",
        "X-Heatmap-Score": f"{heat.score:.6f}",
    }
    return Response(heat.png, media_type="image/png", headers=headers)


def _parse_dt(value: datetime | str) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        dt = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def fmt_time(value: datetime | str) -> str:
    dt = _parse_dt(value)
    return "" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_ago(value: datetime | str) -> str:
    dt = _parse_dt(value)
    if dt is None:
        return ""
    s = max(0, int((datetime.now(UTC) - dt).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"


def age_class(value: datetime | str, sla_s: float) -> str:
    """``age-ok``, ``age-warn`` (past half the SLA) or ``age-late`` (past it), for the queue's age column."""
    dt = _parse_dt(value)
    if dt is None:
        return ""
    age = (datetime.now(UTC) - dt).total_seconds()
    return "age-late" if age >= sla_s else "age-warn" if age >= sla_s / 2 else "age-ok"
