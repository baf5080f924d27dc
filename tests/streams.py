"""A Redis stream's entries as text, for assertions.

The tests' clients decode replies (``decode_responses=True``); redis-py's types cannot know that, so this
one place turns a reply into ``(id, fields)`` strings.
"""

from __future__ import annotations

import redis


def stream_entries(
    client: redis.Redis, key: str, count: int | None = None
) -> list[tuple[str, dict[str, str]]]:
    """``XRANGE key - +``, oldest first."""
    reply = client.xrange(key, count=count) or []
    return [(_text(sid), {_text(k): _text(v) for k, v in (fields or {}).items()}) for sid, fields in reply]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
