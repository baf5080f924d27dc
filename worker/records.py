"""Typed records that cross the boundaries: events in, decisions out.

Events arrive as JSON from a producer we do not own, so they are validated here once; from there on the code
passes these models, never dicts of maybe-fields. Decisions are what the upload pipeline, the review page and
the training pipeline read back. Their JSON Schemas (``moderation schema event|decision``, checked in under
worker/ingress/schemas/) are generated from these models.

Compatibility rule: ``schema_version`` is the MAJOR version of a contract. Within a major version fields are
only added, and optional: a consumer tolerates (and keeps, in ``model_extra``) fields it does not know, so a
producer may send a new field before the workers are upgraded. A newer major version than this code knows is
refused (:class:`UnsupportedVersion`; the worker dead-letters the entry with that reason, to replay after the
upgrade).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from worker.errors import ErrorReason, SchemaError

EVENT_SCHEMA_VERSION = 1  # the major version of the event contract this code reads and writes
DECISION_SCHEMA_VERSION = 1


class UnsupportedVersion(SchemaError):
    """An event of a newer major schema version than this worker understands."""


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
    """One uploaded image to decide (schema version 1).

    Read from a stream entry, a missing ``event_id`` defaults to the entry's id (what ``XADD`` returned, so
    a producer in any language can look its decision up) and a missing ``submitted_at`` to the entry's time.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: int = Field(
        EVENT_SCHEMA_VERSION, ge=1, description="Major version of this contract; newer ones are refused."
    )
    event_id: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        default_factory=lambda: uuid.uuid4().hex,
        description="Idempotency key: the same event_id twice gives one decision.",
    )
    item_id: Annotated[str, Field(min_length=1, max_length=500)]
    image_uri: Annotated[str, Field(min_length=1, max_length=4096)]
    priority: Priority = Priority.NORMAL
    callback_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    submitted_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_entry(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > EVENT_SCHEMA_VERSION:
            raise PydanticCustomError(
                "unsupported_version",
                "schema_version {version} is newer than this worker reads ({known}); upgrade the workers",
                {"version": version, "known": EVENT_SCHEMA_VERSION},
            )
        ctx = info.context
        if ctx and ("event_id" not in data or "submitted_at" not in data):
            data = dict(data)
            data.setdefault("event_id", ctx["event_id"])
            data.setdefault("submitted_at", ctx["submitted_at"])
        return data

    @property
    def extra(self) -> dict[str, Any]:
        """Fields of a newer minor revision this code does not know; kept, never dropped."""
        return dict(self.model_extra or {})

    @classmethod
    def from_json(cls, raw: str | bytes, context: dict[str, Any] | None = None) -> Event:
        """Validate a message at the boundary; raises :class:`SchemaError` with what is wrong.

        ``context`` (``event_id``, ``submitted_at``) supplies defaults for an entry read from a stream.
        """
        try:
            return cls.model_validate_json(raw, context=context)
        except ValidationError as exc:
            if any(e["type"] == "unsupported_version" for e in exc.errors()):
                raise UnsupportedVersion(_short_errors(exc)) from exc
            raise SchemaError(_short_errors(exc)) from exc

    @classmethod
    def from_obj(cls, obj: object) -> Event:
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            if any(e["type"] == "unsupported_version" for e in exc.errors()):
                raise UnsupportedVersion(_short_errors(exc)) from exc
            raise SchemaError(_short_errors(exc)) from exc


_EVENT_ID = re.compile(r'"event_id"\s*:\s*"([^"\\]{1,200})"')


def loose_event_id(raw: str | bytes) -> str:
    """The event id a malformed message names, if any, so the producer side can be found.

    A pattern, not a parser: the body may be truncated, hostile or nested past any recursion limit.
    """
    text = raw[:65536].decode("utf-8", "replace") if isinstance(raw, bytes) else raw[:65536]
    found = _EVENT_ID.search(text)
    return found.group(1) if found else ""


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


class CredentialState(StrEnum):
    """What a C2PA content credential in the file amounts to; only ``trusted`` is ever proof."""

    ABSENT = "absent"  # no manifest in the file
    TRUSTED = "trusted"  # signature and bindings valid, signer chains to a configured trust anchor
    UNTRUSTED = "untrusted"  # signature and bindings valid, signer not on the trust list
    INVALID = "invalid"  # manifest fails validation: tampered after signing, broken signature, bad cert
    REMOTE = "remote"  # the file only points to a manifest on the network, which is never fetched
    UNREADABLE = "unreadable"  # the manifest could not be parsed


class Provenance(BaseModel):
    """Evidence beyond the pixels, read from the fetched bytes: content credential, XMP, EXIF, PDQ hash."""

    model_config = ConfigDict(frozen=True)

    credential: CredentialState = CredentialState.ABSENT
    validation_state: str | None = None  # as the C2PA SDK reports it: Trusted, Valid or Invalid
    validation_failures: list[str] = Field(default_factory=list)  # C2PA status codes, e.g. dataHash.mismatch
    signer: str | None = None  # signing certificate's common name
    signer_org: str | None = None  # its organisation
    claim_generator: str | None = None  # the tool that made the claim, "name/version"
    credential_source_type: str | None = None  # IPTC digital source type in the credential's actions
    remote_manifest: str | None = None  # URL the file points to (never fetched)
    xmp_source_type: str | None = None  # Iptc4xmpExt:DigitalSourceType in the XMP packet, unsigned
    camera_make: str | None = None  # EXIF, unsigned
    camera_model: str | None = None
    software: str | None = None
    declared_ai: bool = False  # some source, signed or not, says generated by AI
    proven_ai: bool = False  # a trusted credential says so: the only provenance that is proof
    pdq: str | None = None  # PDQ perceptual hash, 64 hex digits; None when the image is too flat to hash
    pdq_quality: int | None = None


class MatchedEvent(BaseModel):
    """The earlier decision a near-duplicate inherited its verdict or score from."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    item_id: str
    distance: int  # Hamming distance between the PDQ hashes, 0..256
    source: str  # the matched decision's source: "model", "moderator:NAME", ...


class Decision(BaseModel):
    """Exactly one per event; written idempotently keyed by ``event_id``."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = Field(DECISION_SCHEMA_VERSION, description="Major version of this contract.")
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
    provenance: Provenance | None = None
    matched_event: MatchedEvent | None = None  # set when source is "duplicate"

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Decision:
        return cls.model_validate_json(raw)
