"""Checkpoint registry: immutable versions plus a ``current`` pointer that flips atomically.

Layout (the same on a local directory and under ``s3://bucket/prefix``)::

    versions/<version>/manifest.json, model.safetensors
    current.json   {"version", "promoted_at", "promoted_by", "history": [...]}

A version is written weights-first, manifest-last, and the pointer is only flipped after that, so a worker
that follows ``current`` never finds half a checkpoint. The pointer is one object replaced in one operation
(``os.replace`` locally, a single PUT on S3). Rollback re-points to the previous entry of the history.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, Field, ValidationError

from worker.errors import CheckpointError, InvalidCheckpoint
from worker.media.s3 import S3Uri, make_client
from worker.records import utcnow
from worker.scoring.checkpoint import MANIFEST, Manifest, PlainName, plain_name, read_manifest, sha256_file

if TYPE_CHECKING:
    from worker.settings import Settings

POINTER = "current.json"
HISTORY_LIMIT = 50


class PointerEntry(BaseModel):
    version: PlainName
    promoted_at: datetime = Field(default_factory=utcnow)
    promoted_by: str = "unknown"
    action: str = "promote"


class Pointer(BaseModel):
    version: PlainName
    promoted_at: datetime
    promoted_by: str
    history: list[PointerEntry] = Field(default_factory=list)  # newest last, includes the current entry


class Store(Protocol):
    root: str

    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
    def put_dir(self, local: Path, key: str, files: list[str]) -> None: ...
    def list_dirs(self, key: str) -> list[str]: ...
    def uri(self, key: str) -> str: ...


class LocalStore:
    def __init__(self, root: str | Path) -> None:
        self.path = Path(root).expanduser()
        self.root = str(self.path)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        target = self.path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def put_dir(self, local: Path, key: str, files: list[str]) -> None:
        target = self.path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for name in files:
                shutil.copyfile(local / name, tmp / name)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def list_dirs(self, key: str) -> list[str]:
        base = self.path / key
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def uri(self, key: str) -> str:
        return str(self.path / key)


class S3Store:
    def __init__(self, root: str, settings: Settings) -> None:
        self.loc = S3Uri.parse(root.rstrip("/"))
        self.root = str(self.loc)
        self.client: Any = make_client(settings)

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return bytes(
                self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.join(key).key)["Body"].read()
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.loc.bucket, Key=self.loc.join(key).key, Body=data)

    def put_dir(self, local: Path, key: str, files: list[str]) -> None:
        for name in files:  # caller orders files so the manifest goes last
            self.client.upload_file(str(local / name), self.loc.bucket, self.loc.join(key, name).key)

    def list_dirs(self, key: str) -> list[str]:
        prefix = self.loc.join(key).key.rstrip("/") + "/"
        names: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.loc.bucket, Prefix=prefix, Delimiter="/"
        ):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(prefix) :].strip("/"))
        return sorted(names)

    def uri(self, key: str) -> str:
        return str(self.loc.join(key))


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def root(self) -> str:
        return self.store.root

    def uri_for(self, version: str) -> str:
        return self.store.uri(f"versions/{_version_name(version)}")

    def manifest(self, version: str) -> Manifest:
        raw = self.store.read(f"versions/{_version_name(version)}/{MANIFEST}")
        if raw is None:
            raise CheckpointError(f"version {version!r} is not in the registry at {self.root}")
        try:
            manifest = Manifest.model_validate_json(raw)
        except (ValidationError, UnicodeDecodeError) as exc:
            raise InvalidCheckpoint(f"invalid {MANIFEST} of version {version!r}: {exc}") from exc
        if manifest.version != version:
            raise InvalidCheckpoint(
                f"versions/{version}/{MANIFEST} names another version {manifest.version!r}"
            )
        return manifest

    def versions(self) -> list[Manifest]:
        out = []
        for name in self.store.list_dirs("versions"):
            try:
                out.append(self.manifest(name))
            except (CheckpointError, ValueError):
                continue  # a version still being written has no manifest yet
        return sorted(out, key=lambda m: m.created_at)

    def publish(self, local_dir: str | Path, *, promote: bool = False, by: str = "unknown") -> Manifest:
        """Copy a verified checkpoint in as an immutable version; optionally make it current."""
        local = Path(local_dir)
        manifest = read_manifest(local)
        if sha256_file(local / manifest.weights_file) != manifest.weights_sha256:
            raise CheckpointError(f"{local}: weights do not match the manifest's sha256; not publishing")
        existing = self.store.read(f"versions/{manifest.version}/{MANIFEST}")
        if existing is not None:
            if Manifest.model_validate_json(existing).weights_sha256 != manifest.weights_sha256:
                raise CheckpointError(f"version {manifest.version} already exists with other weights")
        else:
            self.store.put_dir(local, f"versions/{manifest.version}", [manifest.weights_file, MANIFEST])
        if promote:
            self.promote(manifest.version, by=by)
        return manifest

    def pointer(self) -> Pointer | None:
        raw = self.store.read(POINTER)
        if raw is None:
            return None
        try:
            return Pointer.model_validate_json(raw)
        except (ValidationError, UnicodeDecodeError) as exc:
            raise InvalidCheckpoint(f"invalid {POINTER} in the registry at {self.root}: {exc}") from exc

    def current_version(self) -> str | None:
        p = self.pointer()
        return None if p is None else p.version

    def current_uri(self) -> str | None:
        v = self.current_version()
        return None if v is None else self.uri_for(v)

    def _flip(self, version: str, by: str, action: str) -> Pointer:
        self.manifest(version)  # refuses unknown versions
        old = self.pointer()
        entry = PointerEntry(version=version, promoted_by=by, action=action)
        history = ([*old.history] if old else []) + [entry]
        pointer = Pointer(
            version=version, promoted_at=entry.promoted_at, promoted_by=by, history=history[-HISTORY_LIMIT:]
        )
        self.store.write(POINTER, pointer.model_dump_json(indent=2).encode())
        return pointer

    def promote(self, version: str, *, by: str = "unknown") -> Pointer:
        return self._flip(version, by, "promote")

    def rollback(self, *, by: str = "unknown") -> Pointer:
        """Point ``current`` at the version that was current before it."""
        p = self.pointer()
        if p is None:
            raise CheckpointError("nothing to roll back: the registry has no current version")
        for entry in reversed(p.history[:-1]):
            if entry.version != p.version:
                return self._flip(entry.version, by, "rollback")
        raise CheckpointError(f"nothing to roll back to: {p.version} is the only version ever current")


def _version_name(version: str) -> str:
    """Versions become folder names and S3 keys: refuse anything that could point outside ``versions/``."""
    try:
        return plain_name(version)
    except ValueError as exc:
        raise CheckpointError(f"invalid version name: {exc}") from exc


def open_registry(settings: Settings, root: str | None = None) -> Registry:
    root = root or settings.default_registry
    store: Store = S3Store(root, settings) if root.startswith("s3://") else LocalStore(root)
    return Registry(store)
