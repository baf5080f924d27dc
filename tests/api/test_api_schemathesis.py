"""Property-based requests generated from the served OpenAPI document (schemathesis) against a real server:
no input gives a server error, and every answer matches the documented status codes and schemas."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.api.conftest import running_api

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_generated_requests_match_the_openapi_document(
    redis_url: str, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    pytest.importorskip("schemathesis")
    exe = str(Path(sys.executable).parent / "schemathesis")
    with running_api(redis_url, tmp_path / "api", MODERATION_API_SCORE_TIMEOUT_S="0.05") as api:
        done = subprocess.run(
            [
                exe,
                "run",
                f"{api.url}/openapi.json",
                "-H",
                f"Authorization: Bearer {make_token('fuzz')}",
                "--checks",
                "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
                "--max-examples",
                "25",
                "--seed",
                "1",
            ],
            cwd=tmp_path,  # its cache
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
