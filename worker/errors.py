"""Typed failures of the scoring path.

Every way an image can fail maps to one machine-readable :class:`ErrorReason`, so a bad image becomes an
``error`` decision a caller can act on (retry, reject, alert) instead of an exception that fails its batch.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorReason(StrEnum):
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_MANY_BYTES = "too_many_bytes"
    DECODE_TOO_LARGE = "decode_too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    FILE_NOT_FOUND = "file_not_found"
    FORBIDDEN_SOURCE = "forbidden_source"
    NOT_A_REGULAR_FILE = "not_a_regular_file"
    SYMLINK_LOOP = "symlink_loop"
    INVALID_PATH = "invalid_path"
    READ_ERROR = "read_error"
    S3_OBJECT_NOT_FOUND = "s3_object_not_found"
    S3_ACCESS_DENIED = "s3_access_denied"
    HTTP_NOT_FOUND = "http_not_found"
    HTTP_FORBIDDEN = "http_forbidden"
    HTTP_ERROR = "http_error"
    HOST_NOT_ALLOWED = "host_not_allowed"
    UNSUPPORTED_URI = "unsupported_uri"
    FETCH_FAILED = "fetch_failed"
    FETCH_TIMEOUT = "fetch_timeout"
    MALFORMED_EVENT = "malformed_event"
    REDELIVERY_LIMIT = "redelivery_limit"
    MODEL_OUTPUT_INVALID = "model_output_invalid"
    INTERNAL = "internal_error"


class ModerationError(Exception):
    """A failure with a reason; ``transient`` ones may succeed if retried."""

    def __init__(self, reason: ErrorReason, detail: str, *, transient: bool = False) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient


class FetchError(ModerationError):
    """The bytes could not be obtained."""


class DecodeError(ModerationError):
    """The bytes are not an image we are willing to decode."""


class CheckpointError(Exception):
    """A checkpoint is missing, malformed or does not match its manifest."""


class InvalidCheckpoint(CheckpointError):
    """A checkpoint that can never be served (bad manifest, unknown architecture, weights that are not
    safetensors or do not fit, non-finite outputs): versions are immutable, so retrying it is pointless."""


class SchemaError(ValueError):
    """A message at the boundary does not match its schema."""
