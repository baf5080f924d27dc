"""Review-page fixtures: decisions from a real worker process, a tiny model in a registry, a real server.

Decisions are made once per session by a real ``moderation worker`` (Celery on the test's Redis) serving a
checkpoint published in a registry under tmp, so ``model_version`` resolves to a registry version exactly as
in production and the page computes Grad-CAM with that checkpoint.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.served import served
from tests.worker_proc import running_worker
from worker.delivery.store import DecisionStore
from worker.ingress.producer import Producer
from worker.lifecycle.registry import open_registry
from worker.records import Decision, Thresholds, Verdict
from worker.review.app import create_app
from worker.review.auth import User, hash_password, token_digest, write_user
from worker.samples import sample_dir, sample_labels
from worker.scoring.checkpoint import init_checkpoint
from worker.settings import Settings

CROP = 96
PASSWORDS = {"mia": "mia-password-1", "ada": "ada-password-1"}
TOKENS = {"mia": "mia-api-token-0123456789", "ada": "ada-api-token-0123456789"}


@dataclass(frozen=True)
class Registry:
    root: Path
    version: str


@pytest.fixture(scope="session")
def review_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A tiny ConvNeXt published as the registry's current version.

    Its review threshold is 0 and block threshold 1, so every image it scores lands in the review queue
    (a randomly initialised model's scores carry no meaning; the queue's contents are what these tests need).
    """
    base = tmp_path_factory.mktemp("review-registry")
    manifest = init_checkpoint(
        "test_convnext",
        base / "ckpt",
        crop_size=CROP,
        num_crops=4,
        seed=7,
        thresholds=Thresholds(review=0.0, block=1.0),
    )
    open_registry(Settings(registry=str(base / "registry"))).publish(base / "ckpt", promote=True, by="tests")
    return Registry(base / "registry", manifest.version)


@pytest.fixture(scope="session")
def review_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The bundled samples split into two sources, plus an EXIF-rotated photo and a tiny render."""
    root = tmp_path_factory.mktemp("uploads")
    out = []
    for name, label in sample_labels().items():
        folder = root / ("renders" if label else "photos")
        folder.mkdir(exist_ok=True)
        out.append(Path(shutil.copy(sample_dir() / name, folder / name)))
    (root / "phone").mkdir()
    with Image.open(sample_dir() / "skimage__chelsea.jpg") as img:
        stored = img.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says rotate back
        exif = Image.Exif()
        exif[0x0112] = 6
        stored.save(root / "phone" / "rotated.jpg", exif=exif, quality=92)
    out.append(root / "phone" / "rotated.jpg")
    tiny = Image.linear_gradient("L").resize((48, 40)).convert("RGB")
    tiny.save(root / "renders" / "tiny.png")
    out.append(root / "renders" / "tiny.png")
    return out


@dataclass
class Decided:
    settings: Settings
    store: DecisionStore
    decisions: list[Decision]

    def review_items(self) -> list[Decision]:
        return sorted(
            (d for d in self.decisions if d.verdict == Verdict.REVIEW),
            key=lambda d: d.ai_score or 0.0,
            reverse=True,
        )


@pytest.fixture(scope="session")
def worker_decisions(
    redis_server: str,
    review_registry: Registry,
    review_images: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> list[Decision]:
    """Decisions for every image, made once by a real ``moderation worker`` process fed by the real producer.

    The worker serves the registry's copy of the version, so ``model_version`` names a registry version.
    """
    home = tmp_path_factory.mktemp("review-worker")
    settings = Settings(home=home, redis_url=redis_server, namespace=f"rvw{uuid.uuid4().hex[:8]}")
    checkpoint = open_registry(Settings(registry=str(review_registry.root))).uri_for(review_registry.version)
    env = {"MODERATION_NAMESPACE": settings.namespace, "MODERATION_REGISTRY": str(review_registry.root)}
    producer = Producer(settings)
    with running_worker(redis_server, home / "worker", checkpoint, env=env):
        missing = review_images[0].parent / "deleted-before-decided.jpg"
        events = [producer.submit(f"upload-{p.stem}", p.as_uri()) for p in [*review_images, missing]]
        got = producer.wait([e.event_id for e in events], timeout=90)
    producer.close()
    assert len(got) == len(events), "the worker did not decide every event"
    store = DecisionStore.from_url(redis_server, settings.namespace)
    keys = list(store.r.scan_iter(store.keys.pattern))
    store.r.delete(*keys)
    return [got[e.event_id] for e in events]


@pytest.fixture(scope="module")
def decided(
    redis_server: str,
    review_registry: Registry,
    worker_decisions: list[Decision],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Decided]:
    """The worker's decisions in a Redis namespace of this module's own, written by the sink call the worker
    makes, so one module's overrides never show up in another's queue or labels."""
    settings = Settings(
        home=tmp_path_factory.mktemp("review-home"),
        registry=str(review_registry.root),
        redis_url=redis_server,
        namespace=f"rv{uuid.uuid4().hex[:8]}",
        device="cpu",
        decode_threads=2,
        log_format="json",
    )
    store = DecisionStore.from_url(redis_server, settings.namespace)
    assert all(store.write_many(worker_decisions))
    yield Decided(settings, store, list(worker_decisions))
    keys = list(store.r.scan_iter(store.keys.pattern))
    if keys:
        store.r.delete(*keys)


@dataclass
class Server:
    url: str
    settings: Settings
    store: DecisionStore
    decided: Decided

    def login_form(self) -> str:
        return f"{self.url}/login"


def page_settings(decided: Decided, **changes: object) -> Settings:
    """The page's settings: ``mia`` (moderator, user store file) and ``ada`` (admin, from the settings JSON),
    each with a password and an API token."""
    settings = decided.settings.model_copy(
        update={
            "review_users": {
                "ada": {
                    "hash": hash_password(PASSWORDS["ada"]),
                    "role": "admin",
                    "tokens": [token_digest(TOKENS["ada"])],
                }
            },
            "review_users_file": decided.settings.home / "users.json",
            **changes,
        }
    )
    mia = User(name="mia", hash=hash_password(PASSWORDS["mia"]), tokens=(token_digest(TOKENS["mia"]),))
    write_user(decided.settings.home / "users.json", mia)
    return settings


@contextmanager
def serving(decided: Decided, settings: Settings) -> Iterator[Server]:
    """The app on a real uvicorn server in a thread."""
    with served(create_app(settings)) as url:
        yield Server(url, settings, decided.store, decided)


@pytest.fixture(scope="module")
def review_server(decided: Decided) -> Iterator[Server]:
    with serving(decided, page_settings(decided)) as server:
        yield server


CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed; scripts/test installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def loaded(page: Any, selector: str) -> int:
    """Wait until an <img> finished loading and return its naturalWidth (0 means it failed)."""
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete; }", arg=selector, timeout=30_000
    )
    return int(page.eval_on_selector(selector, "i => i.naturalWidth"))
