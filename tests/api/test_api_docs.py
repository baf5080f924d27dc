"""The Node.js producer printed in docs/api.md, run as written against a real API server and worker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.api.conftest import running_api
from tests.conftest import REPO
from tests.core import images
from tests.worker_proc import running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def doc_block(heading: str, lang: str) -> str:
    text = (REPO / "docs" / "api.md").read_text()
    section = text[text.index(heading) :]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block under {heading!r}"
    return match.group(1)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js 18+")
def test_the_documented_node_producer_works(
    redis_url: str, tmp_path: Path, tiny_checkpoint: Path, make_token: Callable[..., str]
) -> None:
    image = tmp_path / "42.jpg"
    image.write_bytes(images.jpeg(128, 96, seed=2))
    script = doc_block("## A producer in Node.js", "js").replace("s3://uploads/2026/12/42.jpg", str(image))
    (tmp_path / "producer.mjs").write_text(script)
    allow = {"MODERATION_CALLBACK_ALLOW_HOSTS": '["hooks.example.com"]'}  # the callback the example names
    with (
        running_worker(
            redis_url, tmp_path / "w", tiny_checkpoint, env={"MODERATION_WEBHOOK_DISPATCH_IN_WORKER": "false"}
        ),
        running_api(redis_url, tmp_path / "api", **allow) as api,
    ):
        env = {**os.environ, "MODERATION_API": api.url, "MODERATION_TOKEN": make_token("node")}
        done = subprocess.run(
            ["node", "producer.mjs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    verdict, score = done.stdout.split()
    assert verdict in {"allow", "review", "block"} and 0.0 <= float(score) <= 1.0
