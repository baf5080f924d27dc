"""The stream contract: what an entry on ``{ns}:events`` / ``{ns}:urgent`` must hold, and how it is read.

An entry has one field, ``event``, whose value is the event JSON (:class:`worker.records.Event`, schema
``moderation schema event``); other entry fields are ignored. Any language enqueues with
``XADD {ns}:events * event '<json>'``. Every entry a worker reads goes through :func:`parse_entry` before
anything else touches it: the result is an :class:`~worker.records.Event` or a :class:`Rejected` with the
dead-letter reason and the whole raw body, never an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from worker.errors import SchemaError
from worker.keys import EVENT_FIELD
from worker.records import Event, UnsupportedVersion, loose_event_id


class DeadLetterReason(StrEnum):
    MALFORMED_EVENT = "malformed_event"
    UNSUPPORTED_VERSION = "unsupported_version"
    EVENT_TOO_LARGE = "event_too_large"
    REDELIVERY_LIMIT = "redelivery_limit"


@dataclass(frozen=True)
class Rejected:
    """An entry that cannot become an event: why, and its body as received (whole)."""

    reason: DeadLetterReason
    detail: str
    raw: bytes
    event_id: str = ""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entry_time(entry_id: str) -> datetime:
    """When Redis added an entry (the millisecond part of its id)."""
    return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, UTC)


def default_event_id(stream_kind: str, entry_id: str) -> str:
    """The event id of an entry whose JSON names none: its entry id (``urgent:`` prefixed on that stream)."""
    return entry_id if stream_kind == "events" else f"{stream_kind}:{entry_id}"


def parse_entry(stream_kind: str, entry_id: str, fields: dict[Any, Any], max_bytes: int) -> Event | Rejected:
    """Validate one stream entry; never raises."""
    try:
        return _parse(stream_kind, entry_id, fields, max_bytes)
    except Exception as exc:  # whatever else hostile input finds: still one dead letter, never a crash
        body = fields.get(EVENT_FIELD.encode(), fields.get(EVENT_FIELD))
        raw = body if isinstance(body, bytes) else repr(fields).encode()
        return Rejected(DeadLetterReason.MALFORMED_EVENT, f"{type(exc).__name__}: {exc}", raw)


def _parse(stream_kind: str, entry_id: str, fields: dict[Any, Any], max_bytes: int) -> Event | Rejected:
    raw: bytes | None = None
    try:
        by_name = {_text(k): v for k, v in fields.items()}
        body = by_name.get(EVENT_FIELD)
        if body is None:
            whole = json.dumps({k: _text_or_repr(v) for k, v in by_name.items()}).encode()
            detail = f"the entry has no {EVENT_FIELD!r} field (found: {sorted(by_name)})"
            return Rejected(DeadLetterReason.MALFORMED_EVENT, detail, whole)
        raw = body if isinstance(body, bytes) else str(body).encode()
        if len(raw) > max_bytes:
            detail = f"{len(raw)} bytes, over the {max_bytes}-byte limit (MODERATION_MAX_EVENT_BYTES)"
            return Rejected(DeadLetterReason.EVENT_TOO_LARGE, detail, raw, loose_event_id(raw))
        context = {"event_id": default_event_id(stream_kind, entry_id), "submitted_at": entry_time(entry_id)}
        return Event.from_json(raw, context=context)
    except UnsupportedVersion as exc:
        assert raw is not None
        return Rejected(DeadLetterReason.UNSUPPORTED_VERSION, str(exc), raw, loose_event_id(raw))
    except SchemaError as exc:
        assert raw is not None
        return Rejected(DeadLetterReason.MALFORMED_EVENT, str(exc), raw, loose_event_id(raw))


def _text_or_repr(v: Any) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return repr(v)
    return str(v)
