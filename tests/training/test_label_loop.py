"""The whole label loop with real processes: a worker decides, moderators correct it on the review page,
``labels build`` joins the teacher's stream, the decisions and the overrides, ``adapt`` trains and gates a
candidate and publishes it, and the same running worker hot-reloads it and now scores the corrected images
on the moderators' side of its threshold."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli, subprocess_env
from tests.review.conftest import Decided, page_settings, serving
from tests.review.test_review_security import csrf_in, sign_in
from tests.waiting import eventually
from tests.worker_proc import running_worker
from worker.delivery.store import DecisionStore
from worker.ingress.producer import Producer
from worker.lifecycle.registry import LocalStore, Registry
from worker.records import Decision, Thresholds, Verdict
from worker.scoring.checkpoint import save_checkpoint
from worker.scoring.model import create_model, data_config
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NS = "loop"
REVIEW = 0.4  # the served model's review threshold: at or above it an item is not allowed
SIZE = 48


def undecided_checkpoint(path: Path) -> Path:
    """A real test_convnext whose head ignores the image: every score 0.5, so every item is queued for
    review (above the review threshold, below block), the real photos on the wrong side."""
    torch.manual_seed(0)
    model = create_model("test_convnext")
    head = model.get_classifier()  # type: ignore[operator]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    mean, std = data_config("test_convnext")
    thresholds = Thresholds(review=REVIEW, block=0.9)
    save_checkpoint(
        model, path, arch="test_convnext", crop_size=32, mean=mean, std=std, thresholds=thresholds
    )
    return path


def picture(path: Path, ai: bool, rng: np.random.Generator) -> Path:
    """A small noisy picture; the generator's are warm, the camera's cool: a signal a tiny model learns."""
    tint = np.array([90, 20, 0] if ai else [0, 20, 90], dtype=float)
    pixels = np.clip(rng.uniform(0, 140, (SIZE, SIZE, 3)) + tint, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def decide(producer: Producer, images: list[Path], prefix: str) -> dict[Path, Decision]:
    events = {p: producer.submit(f"{prefix}-{p.stem}", p.as_uri()) for p in images}
    got = producer.wait([e.event_id for e in events.values()], timeout=90)
    assert len(got) == len(events), "the worker did not decide every event"
    return {p: got[e.event_id] for p, e in events.items()}


def override(server_url: str, mia: httpx.Client, event_id: str, action: str) -> None:
    """What the item page's button sends: the action, the decision version the page showed, the CSRF token."""
    html = mia.get(f"/items/{event_id}").text
    version = re.search(r'name="version" value="(\d+)"', html)
    assert version, "the item page carries no decision version"
    r = mia.post(
        f"/items/{event_id}/action",
        data={"action": action, "version": version.group(1), "csrf_token": csrf_in(html)},
        headers={"Origin": server_url},
    )
    assert r.status_code == 303, r.text


def test_moderators_corrections_reach_the_served_model(redis_url: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reg_dir = tmp_path / "registry"
    registry = Registry(LocalStore(reg_dir))
    first = registry.publish(undecided_checkpoint(tmp_path / "v1"), promote=True, by="test").version
    generated = [picture(tmp_path / "uploads" / f"gen{i}.png", True, rng) for i in range(4)]
    photos = [picture(tmp_path / "uploads" / f"cam{i}.png", False, rng) for i in range(4)]
    # last run's labels: two rows to rehearse, four held out for the gate
    old = [(picture(tmp_path / "old" / f"o{i}.png", i % 2 == 0, rng), i % 2 == 0) for i in range(6)]
    pd.DataFrame(
        {
            "image_uri": [str(p) for p, _ in old],
            "ai_score": [0.9 if ai else 0.1 for _, ai in old],
            "split": ["train", "train", "test", "test", "test", "test"],
        }
    ).to_csv(tmp_path / "old" / "labels.csv", index=False)

    settings = Settings(
        home=tmp_path / "home", registry=str(reg_dir), redis_url=redis_url, namespace=NS, device="cpu"
    )
    store = DecisionStore.from_url(redis_url, NS)
    env = {"MODERATION_NAMESPACE": NS, "MODERATION_REGISTRY": str(reg_dir), "MODERATION_RELOAD_POLL_S": "30"}
    # copies of an overridden image inherit the moderator's verdict (tests/provenance); here the resubmitted
    # images must be scored by the model itself, so the worker does not look for copies
    env["MODERATION_DUPLICATES"] = "false"
    cli_env = {
        "REDIS_URL": redis_url,
        **env,
        "MODERATION_HOME": str(settings.home),
        "MODERATION_DEVICE": "cpu",
    }
    producer = Producer(settings)
    with running_worker(redis_url, tmp_path / "worker", env=env) as worker:
        assert worker.heartbeat().get("model_version") == first
        before = decide(producer, [*generated, *photos], "up")
        assert all(d.verdict == Verdict.REVIEW and d.model_version == first for d in before.values())
        wrong = [p for p in photos if (before[p].ai_score or 0.0) >= REVIEW]  # real, not allowed
        assert wrong == photos

        # the teacher scores what it sees; the moderators correct the model's wrong side on the page
        for p in generated:
            store.r.xadd(store.keys.teacher, {"image_uri": p.as_uri(), "ai_score": "0.95", "model": "t1"})
        with serving(Decided(settings, store, []), page_settings(Decided(settings, store, []))) as server:
            mia = sign_in(server, "mia")
            token = csrf_in(mia.get("/queue").text)
            r = mia.post("/queue/claim", data={"csrf_token": token}, headers={"Origin": server.url})
            assert r.status_code == 303
            held = {e for e, c in store.claims().items() if c.moderator == "mia"}
            assert {before[p].event_id for p in wrong} <= held
            for p in wrong:
                override(server.url, mia, before[p].event_id, "mark_real")
            mia.close()
        assert all(store.get(before[p].event_id).verdict == Verdict.ALLOW for p in wrong)  # type: ignore[union-attr]

        labels = tmp_path / "labels.parquet"
        built = run_cli(
            *("labels", "build", "-o", str(labels), "--teacher-from-redis"),
            *("--decisions-from-redis", "--overrides-from-redis"),
            env=subprocess_env(**cli_env),
        )
        assert built.returncode == 0, built.stdout + built.stderr
        table = pd.read_parquet(labels).set_index("image_uri")
        assert len(table) == 8 and (table["model_version"] == first).all()
        assert (table.loc[[p.as_uri() for p in wrong], "label_source"] == "override").all()
        assert (table.loc[[p.as_uri() for p in wrong], "ai_score"] == 0.0).all()

        # the gate's margin is wide on purpose: four held-out items show the gate runs, not that it is wise
        adapted = run_cli(
            *("adapt", "-l", str(labels), "-o", str(tmp_path / "run"), "--init-from", "current"),
            *("--rehearsal-labels", str(tmp_path / "old" / "labels.csv"), "--no-probe"),
            *("--epochs", "12", "--lr", "0.003", "--batch-size", "8", "--device", "cpu", "--publish"),
            *("--margin", "1", "--min-heldout", "4", "--min-per-class-gate", "2", "--n-boot", "200"),
            env=subprocess_env(**cli_env),
        )
        assert adapted.returncode == 0, adapted.stdout + adapted.stderr
        new = registry.current_version()
        assert new is not None and new != first and new in adapted.stdout
        eventually(lambda: worker.heartbeat().get("model_version") == new, "the worker to hot-reload")

        after = decide(producer, [*wrong, *generated], "again")
        assert all(d.model_version == new for d in after.values()), [
            (d.model_version, d.source, d.ai_score) for d in after.values()
        ]
        scores = {p.name: after[p].ai_score for p in after}
        assert all((after[p].ai_score or 0.0) < REVIEW for p in wrong), scores  # the moderators' side
        assert all((after[p].ai_score or 0.0) >= REVIEW for p in generated), scores  # still not allowed
        assert all(after[p].verdict == Verdict.ALLOW for p in wrong)
    producer.close()
