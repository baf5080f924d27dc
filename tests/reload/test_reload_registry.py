"""The registry on a directory and on a real S3 endpoint: immutable versions, atomic pointer, history."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worker.errors import CheckpointError
from worker.lifecycle.registry import Registry
from worker.scoring.checkpoint import MANIFEST, read_manifest


def test_publish_lists_versions_and_promote_flips_current(
    registry: Registry, ckpt_a: Path, ckpt_b: Path
) -> None:
    a, b = read_manifest(ckpt_a).version, read_manifest(ckpt_b).version
    assert registry.pointer() is None and registry.versions() == []

    registry.publish(ckpt_a, promote=True, by="alice")
    registry.publish(ckpt_b, by="bob")
    assert [m.version for m in registry.versions()] == [a, b]  # ordered by created_at
    assert registry.current_version() == a  # publishing b alone does not promote it

    pointer = registry.promote(b, by="carol")
    assert registry.current_version() == b == pointer.version
    assert registry.current_uri() == registry.uri_for(b)
    assert [(e.version, e.promoted_by, e.action) for e in pointer.history] == [
        (a, "alice", "promote"),
        (b, "carol", "promote"),
    ]
    assert pointer.history[0].promoted_at <= pointer.history[1].promoted_at


def test_rollback_returns_to_the_previous_current(registry: Registry, ckpt_a: Path, ckpt_b: Path) -> None:
    a = registry.publish(ckpt_a, promote=True).version
    with pytest.raises(CheckpointError, match="only version"):
        registry.rollback()
    b = registry.publish(ckpt_b, promote=True).version
    assert registry.rollback(by="dave").version == a
    assert registry.pointer().history[-1].action == "rollback"  # type: ignore[union-attr]
    # Rolling back again goes to b (the version current before a's return), not further into the past.
    assert registry.rollback().version == b


def test_promote_refuses_unknown_versions(registry: Registry, ckpt_a: Path) -> None:
    registry.publish(ckpt_a, promote=True)
    with pytest.raises(CheckpointError, match="not in the registry"):
        registry.promote("no-such-version")
    assert registry.current_version() == read_manifest(ckpt_a).version


def test_publish_refuses_weights_that_do_not_match_their_manifest(
    registry: Registry, ckpt_a: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ckpt_a, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="sha256"):
        registry.publish(bad)
    assert registry.versions() == []


def test_versions_are_immutable(registry: Registry, ckpt_a: Path, ckpt_b: Path, tmp_path: Path) -> None:
    registry.publish(ckpt_a)
    registry.publish(ckpt_a)  # the same bytes again: idempotent
    impostor = tmp_path / "impostor"
    shutil.copytree(ckpt_b, impostor)
    manifest = json.loads((impostor / MANIFEST).read_text())
    manifest["version"] = read_manifest(ckpt_a).version  # other weights under a's name
    (impostor / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="already exists"):
        registry.publish(impostor)
    assert [m.weights_sha256 for m in registry.versions()] == [read_manifest(ckpt_a).weights_sha256]
