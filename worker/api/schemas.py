"""Request and response bodies of the HTTP API (the OpenAPI document is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(
        description="Machine-readable: unauthorized, forbidden, not_found, invalid_request, ..."
    )
    message: str = Field(description="What went wrong, for a person.")
    details: list[dict[str, Any]] | None = Field(None, description="Per-field problems of invalid requests.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Accepted(BaseModel):
    event_ids: list[str] = Field(description="One per submitted event, in the order given.")


class Pending(BaseModel):
    event_id: str
    status: Literal["pending"] = "pending"
    decision_url: str = Field(description="Where the decision will be: GET it later.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: bool


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body could not be read (not UTF-8 JSON)."},
    401: {"model": ErrorResponse, "description": "No token, or an unknown one."},
    403: {"model": ErrorResponse, "description": "The token lacks the scope this route needs."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
    422: {"model": ErrorResponse, "description": "The body does not match the schema."},
}
BUSY: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "Backlog full: retry after the Retry-After seconds."}
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No decision (yet)."}
}
