"""Typed records that cross the boundaries: events in, decisions out.

Events arrive as JSON from a producer we do not own, so they are validated here once; from there on the code
passes these models, never dicts of maybe-fields. Decisions are what the upload pipeline, the review page and
the training pipeline read back.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.errors import ErrorReason, SchemaError

EVENT_SCHEMA_VERSION: Literal[1] = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class Verdict(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    BLOCK = "block"
    ERROR = "error"


class Priority(StrEnum):
    NORMAL = "normal"
    URGENT = "urgent"


class Event(BaseModel):
    """One uploaded image to decide (schema version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    event_id: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        default_factory=lambda: uuid.uuid4().hex
    )
    item_id: Annotated[str, Field(min_length=1, max_length=500)]
    image_uri: Annotated[str, Field(min_length=1, max_length=4096)]
    priority: Priority = Priority.NORMAL
    callback_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    submitted_at: datetime = Field(default_factory=utcnow)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        """Validate a message at the boundary; raises :class:`SchemaError` with what is wrong."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise SchemaError(_short_errors(exc)) from exc

    @classmethod
    def from_obj(cls, obj: object) -> Event:
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise SchemaError(_short_errors(exc)) from exc


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class Box(BaseModel):
    """A crop window in display-orientation pixel coordinates of the (possibly upscaled) image."""

    model_config = ConfigDict(frozen=True)

    left: int
    top: int
    right: int
    bottom: int


class CropScore(BaseModel):
    model_config = ConfigDict(frozen=True)

    box: Box
    ai_score: float


class Thresholds(BaseModel):
    """Scores at or above ``review`` go to moderators; at or above ``block`` are blocked."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    review: float = Field(0.5, ge=0.0, le=1.0)
    block: float = Field(0.9, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        """Block below review would block what it never sends to moderators: a calibration mistake."""
        if self.block < self.review:
            raise ValueError(f"block threshold {self.block} is below review threshold {self.review}")
        return self


class Decision(BaseModel):
    """Exactly one per event; written idempotently keyed by ``event_id``."""

    model_config = ConfigDict(frozen=True)

    item_id: str
    event_id: str
    image_uri: str
    verdict: Verdict
    ai_score: float | None = None
    crops: list[CropScore] = Field(default_factory=list)
    deciding_crop: int | None = None
    model_version: str | None = None
    thresholds: Thresholds | None = None
    reason: ErrorReason | None = None
    detail: str | None = None
    image_size: tuple[int, int] | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    source: str = "model"
    batch_id: str | None = None  # the model call that decided it (worker-local counter, for tracing)
    decided_at: datetime = Field(default_factory=utcnow)
    priority: Priority | None = None  # the event's, carried so readers need not keep the event
    metadata: dict[str, Any] = Field(default_factory=dict)  # the event's, as the producer sent it

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Decision:
        return cls.model_validate_json(raw)
