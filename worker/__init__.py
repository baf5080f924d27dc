"""Self-hosted AI-generated image moderation: the scoring path and the pieces training shares with it.

``from worker import Producer`` is the client API; it needs only the base install (no torch). The name is
resolved on first use so that importing the package stays free of side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.ingress.producer import Producer

__all__ = ["Producer"]


def __getattr__(name: str) -> Any:
    if name == "Producer":
        from worker.ingress.producer import Producer

        return Producer
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
