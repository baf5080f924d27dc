"""Registry/hot-reload fixtures: tiny checkpoints, broken variants, a registry on disk or on S3."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from worker.lifecycle.registry import Registry, open_registry
from worker.scoring.checkpoint import MANIFEST, init_checkpoint, load_checkpoint, save_checkpoint
from worker.settings import Settings


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reload-ckpts")


@pytest.fixture(scope="session")
def ckpt_a(ckpt_dir: Path) -> Path:
    init_checkpoint("test_convnext", ckpt_dir / "a", crop_size=64, seed=1)
    return ckpt_dir / "a"


@pytest.fixture(scope="session")
def ckpt_b(ckpt_dir: Path) -> Path:
    init_checkpoint("test_convnext", ckpt_dir / "b", crop_size=64, seed=2)
    return ckpt_dir / "b"


@pytest.fixture(scope="session")
def ckpt_a_twin(ckpt_dir: Path, ckpt_a: Path) -> Path:
    """The weights of ``a`` under another version name: a shadow of it must agree 100%."""
    src = load_checkpoint(ckpt_a)
    m = src.manifest
    save_checkpoint(
        src.model,
        ckpt_dir / "a-twin",
        version=f"{m.version}-twin",
        arch=m.arch,
        crop_size=m.crop_size,
        mean=m.mean,
        std=m.std,
        thresholds=m.thresholds,
    )
    return ckpt_dir / "a-twin"


@pytest.fixture(scope="session")
def ckpt_bad_golden(ckpt_dir: Path) -> Path:
    """Valid weights whose manifest records golden scores the model does not reproduce (a mismatched
    manifest, e.g. written for other weights): publish accepts it (checksum fine), workers must refuse it."""
    path = ckpt_dir / "bad-golden"
    init_checkpoint("test_convnext", path, crop_size=64, seed=3)
    manifest = json.loads((path / MANIFEST).read_text())
    for g in manifest["golden"]:
        g["logit"] += 4.0
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="session")
def ckpt_c(ckpt_dir: Path) -> Path:
    """A third good checkpoint, to be corrupted after publishing."""
    init_checkpoint("test_convnext", ckpt_dir / "c", crop_size=64, seed=4)
    return ckpt_dir / "c"


@pytest.fixture(params=["local", "s3"])
def registry_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same tests on a registry directory and on a real S3 HTTP endpoint (moto server mode)."""
    if request.param == "local":
        yield str(tmp_path / "registry")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/models"


@pytest.fixture
def reg_settings(tmp_path: Path, registry_root: str, request: pytest.FixtureRequest) -> Settings:
    endpoint = request.getfixturevalue("s3_endpoint") if registry_root.startswith("s3://") else None
    return Settings(
        home=tmp_path / "home",
        device="cpu",
        log_format="json",
        decode_threads=2,
        registry=registry_root,
        s3_endpoint_url=endpoint,
        reload_poll_s=0.2,
        reload_warmup_batch=2,
    )


@pytest.fixture
def registry(reg_settings: Settings) -> Registry:
    return open_registry(reg_settings)


def corrupt_weights(registry: Registry, settings: Settings, version: str) -> None:
    """Flip bytes of a published version's weights in place, as a bad disk or a bad upload would."""
    key = f"versions/{version}/model.safetensors"
    data = bytearray(registry.store.read(key) or b"")
    assert data, f"{key} not found"
    data[-10:] = bytes(255 - b for b in data[-10:])
    if registry.root.startswith("s3://"):
        registry.store.write(key, bytes(data))
    else:
        (Path(registry.root) / key).write_bytes(bytes(data))


@pytest.fixture
def corrupt() -> Callable[[Registry, Settings, str], None]:
    return corrupt_weights


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
