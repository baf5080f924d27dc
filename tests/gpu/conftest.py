"""GPU tests: the scoring and training paths on CUDA, compared with the CPU's fp32 results.

Every test here is marked ``gpu``; without CUDA it is skipped (tests/conftest.py). ``pytest -m gpu``
on a CUDA host runs them. ``MODERATION_GPU_TEST_DEVICE=cpu`` runs their logic on the CPU, leaving out the
assertions that only hold on CUDA (bf16 autocast, channels_last), so they can be checked without a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.settings import Settings


@pytest.fixture(scope="session")
def device() -> str:
    return os.environ.get("MODERATION_GPU_TEST_DEVICE") or "cuda"


@pytest.fixture
def cpu_settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home-cpu", device="cpu", decode_threads=2, log_format="json")


@pytest.fixture
def gpu_settings(tmp_path: Path, device: str) -> Settings:
    return Settings(home=tmp_path / "home-gpu", device=device, decode_threads=2, log_format="json")
