"""Hostile-input fixtures: broken checkpoints written straight into a real registry (disk or moto S3).

A registry writer is not bound by ``moderation publish`` (which validates): these helpers write what an
attacker or a buggy pipeline could, file by file, and flip the pointer by hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.reload.conftest import ckpt_a, ckpt_b, ckpt_dir, reg_settings, registry, registry_root
from worker.lifecycle.registry import POINTER, Registry
from worker.scoring.checkpoint import MANIFEST, load_checkpoint

__all__ = ["ckpt_a", "ckpt_b", "ckpt_dir", "reg_settings", "registry", "registry_root"]


def nan_weights(good: Path) -> bytes:
    """The weights of ``good`` with a NaN head bias: every output is NaN."""
    model = load_checkpoint(good).model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                last = param
        last.fill_(float("nan"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = good.parent / f".nan-{good.name}.safetensors"
    save_file(state, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def write_version(
    registry: Registry,
    good: Path,
    version: str,
    *,
    weights: bytes | None = None,
    manifest_edit: Callable[[dict[str, Any]], None] | None = None,
    weights_key: str | None = None,
) -> str:
    """Write ``versions/<version>/`` from a good checkpoint, weights and manifest altered as asked."""
    manifest = json.loads((good / MANIFEST).read_text())
    data = weights if weights is not None else (good / manifest["weights_file"]).read_bytes()
    manifest["version"] = version
    manifest["weights_sha256"] = hashlib.sha256(data).hexdigest()
    if manifest_edit is not None:
        manifest_edit(manifest)
    name = weights_key or manifest["weights_file"]
    if "/" not in name and ".." not in name:
        registry.store.write(f"versions/{version}/{name}", data)
    registry.store.write(f"versions/{version}/{MANIFEST}", json.dumps(manifest).encode())
    return version


def point_at(registry: Registry, version: str) -> None:
    """Flip ``current`` by hand (no validation), keeping the history a promote would have kept."""
    raw = registry.store.read(POINTER)
    old = json.loads(raw) if raw else {"history": []}
    entry = {
        "version": version,
        "promoted_at": "2026-12-01T00:00:00Z",
        "promoted_by": "t",
        "action": "promote",
    }
    pointer = {**entry, "history": [*old["history"], entry]}
    pointer.pop("action")
    registry.store.write(POINTER, json.dumps(pointer).encode())


@pytest.fixture
def broken_versions() -> dict[str, Callable[[Registry, Path], str]]:
    """Name -> writer of one broken version; each returns the version name it wrote."""

    def edit(**fields: Any) -> Callable[[dict[str, Any]], None]:
        return lambda m: m.update(fields)

    def nan(reg: Registry, good: Path) -> str:
        return write_version(reg, good, "nan-model", weights=nan_weights(good))

    def inverted(reg: Registry, good: Path) -> str:
        return write_version(
            reg, good, "inverted", manifest_edit=edit(thresholds={"review": 0.9, "block": 0.2})
        )

    def out_of_range(reg: Registry, good: Path) -> str:
        return write_version(reg, good, "range", manifest_edit=edit(thresholds={"review": -1, "block": 2}))

    def unknown_arch(reg: Registry, good: Path) -> str:
        return write_version(reg, good, "unknown-arch", manifest_edit=edit(arch="no_such_architecture_x"))

    def pickle_weights(reg: Registry, good: Path) -> str:
        import io

        buf = io.BytesIO()
        torch.save(load_checkpoint(good).model.state_dict(), buf)
        return write_version(reg, good, "pickle-weights", weights=buf.getvalue())

    def garbage_weights(reg: Registry, good: Path) -> str:
        return write_version(reg, good, "garbage-weights", weights=b"\xff" * 4096)

    def huge_crop(reg: Registry, good: Path) -> str:
        return write_version(reg, good, "huge-crop", manifest_edit=edit(crop_size=100_000))

    def nan_golden(reg: Registry, good: Path) -> str:
        def f(m: dict[str, Any]) -> None:
            m["golden"][0]["logit"] = None

        return write_version(reg, good, "nan-golden", manifest_edit=f)

    def traversal(reg: Registry, good: Path) -> str:
        return write_version(
            reg, good, "traversal", manifest_edit=edit(weights_file="../../evil.safetensors")
        )

    def absolute(reg: Registry, good: Path) -> str:
        return write_version(reg, good, "absolute", manifest_edit=edit(weights_file="/tmp/evil.safetensors"))

    return {
        "nan": nan,
        "inverted": inverted,
        "out_of_range": out_of_range,
        "unknown_arch": unknown_arch,
        "pickle_weights": pickle_weights,
        "garbage_weights": garbage_weights,
        "huge_crop": huge_crop,
        "nan_golden": nan_golden,
        "traversal": traversal,
        "absolute": absolute,
    }
