"""One way for a test to wait for something a real process does: poll until it holds, or fail saying what."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy and return that; after ``timeout`` seconds fail with
    ``what`` and the last value seen. Exceptions from ``check`` propagate: a wait must not hide a bug."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        time.sleep(interval)
