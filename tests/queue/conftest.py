"""Fixtures the queue tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.ingress.producer import Producer
from worker.settings import Settings


@pytest.fixture
def producer(redis_url: str, tmp_path: Path) -> Producer:
    """The upload pipeline's side: a Producer on the test's flushed Redis."""
    return Producer(Settings(redis_url=redis_url, home=tmp_path / "home"))
