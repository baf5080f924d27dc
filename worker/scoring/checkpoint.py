"""Self-describing checkpoints: ``model.safetensors`` + ``manifest.json`` in one directory.

The manifest carries everything serving needs (architecture, crop size, normalisation, aggregation,
thresholds) and everything needed to trust the weights (sha256, golden-image reference scores). Writes go to a
temporary sibling directory renamed into place, so a reader never sees half a checkpoint. Loading verifies the
checksum before a single tensor is read and uses safetensors, which cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from worker.errors import CheckpointError, InvalidCheckpoint
from worker.media.s3 import S3Uri, make_client
from worker.records import Thresholds, utcnow
from worker.scoring.golden import GOLDEN_NAMES, golden_crops
from worker.scoring.model import create_model, to_input

if TYPE_CHECKING:
    from worker.settings import Settings

Logits = TypeVar("Logits", float, npt.NDArray[np.float64])

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MAX_CROP_SIZE = (
    1024  # ConvNeXt-Tiny at 1024 px is ~21x the work of 224 px; beyond it is a mistake or an attack
)
MAX_NUM_CROPS = 64
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def plain_name(value: str) -> str:
    """A file or version name that stays inside its folder on disk and on S3: no separator, no ``..``."""
    if not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{value[:100]!r} is not a plain name (letters, digits, . _ + -; no '..', no '/')")
    return value


def weights_name(value: str) -> str:
    plain_name(value)
    if not value.endswith(".safetensors"):
        raise ValueError(f"weights file {value!r} is not a .safetensors file")
    return value


PlainName = Annotated[str, AfterValidator(plain_name)]


class GoldenScore(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    name: str
    logit: float


class Calibration(BaseModel):
    """A monotone map of the model's logit, fitted on moderator labels: ``logit / temperature + offset``.

    It changes scores and so verdicts, never the ranking; a recalibrated version ships the same weights.
    """

    model_config = ConfigDict(frozen=True)

    temperature: float = Field(1.0, gt=0.0)
    offset: float = 0.0
    fitted_on: int = Field(0, ge=0, description="labelled items the fit used")

    def apply(self, logits: Logits) -> Logits:
        return logits / self.temperature + self.offset


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    format_version: Literal[1] = 1
    version: PlainName
    arch: Annotated[str, Field(min_length=1, max_length=200)]
    crop_size: int = Field(224, ge=8, le=MAX_CROP_SIZE)
    num_crops: int = Field(1, ge=1, le=MAX_NUM_CROPS)
    aggregation: Literal["max", "mean"] = "max"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    thresholds: Thresholds = Field(default_factory=Thresholds)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_snapshot: str | None = None
    parent_version: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    weights_file: Annotated[str, AfterValidator(weights_name)] = WEIGHTS
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    golden: list[GoldenScore] = Field(default_factory=list)
    notes: str = ""
    calibration: Calibration | None = Field(None, description="Applied to the aggregated logit when set.")

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, value: tuple[float, float, float], info: Any) -> tuple[float, float, float]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError(f"{info.field_name} must be finite")
        if info.field_name == "std" and not all(v > 0 for v in value):
            raise ValueError("std must be positive")
        return value


@dataclass
class Checkpoint:
    manifest: Manifest
    model: nn.Module
    path: Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.inference_mode()
def golden_logits(model: nn.Module, crop_size: int, mean: Any, std: Any, device: str = "cpu") -> list[float]:
    model.eval()
    x = to_input(golden_crops(crop_size), mean, std, device)
    return [float(v) for v in model(x).float().reshape(-1).cpu()]


def make_version(arch: str, sha: str, when: datetime) -> str:
    return f"{arch}-{when:%Y%m%d-%H%M%S}-{sha[:8]}"


def save_checkpoint(model: nn.Module, out_dir: str | Path, **fields: Any) -> Manifest:
    """Write weights and manifest atomically; ``fields`` fill the manifest (arch, mean, std, ...)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"refusing to overwrite non-empty directory {out}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        sha = sha256_file(tmp / WEIGHTS)
        created = fields.pop("created_at", None) or utcnow()
        crop_size = int(fields.get("crop_size", 224))
        golden = golden_logits(model, crop_size, fields["mean"], fields["std"])
        manifest = Manifest(
            version=fields.pop("version", None) or make_version(fields["arch"], sha, created),
            created_at=created,
            weights_sha256=sha,
            golden=[GoldenScore(name=n, logit=v) for n, v in zip(GOLDEN_NAMES, golden, strict=True)],
            **fields,
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json((path / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"no {MANIFEST} in {path}") from exc
    except (ValidationError, UnicodeDecodeError) as exc:
        raise InvalidCheckpoint(f"invalid {MANIFEST} in {path}: {exc}") from exc


def fetch_checkpoint(uri: str, settings: Settings | None = None, cache_dir: Path | None = None) -> Path:
    """A local directory holding the checkpoint at ``uri`` (downloaded once from s3:// into a cache).

    ``settings`` (S3 client, cache folder) is needed for s3:// only.
    """
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {path}")
        return path
    if settings is None:
        raise CheckpointError(f"{uri}: an s3:// checkpoint needs the S3 settings")
    from botocore.exceptions import ClientError

    client = make_client(settings)
    loc = S3Uri.parse(uri.rstrip("/"))
    try:
        raw = client.get_object(Bucket=loc.bucket, Key=loc.join(MANIFEST).key)["Body"].read()
        manifest = Manifest.model_validate_json(raw)
    except ClientError as exc:
        raise CheckpointError(f"cannot read {uri}/{MANIFEST}: {exc}") from exc
    except (ValidationError, UnicodeDecodeError) as exc:
        raise InvalidCheckpoint(f"invalid {MANIFEST} at {uri}: {exc}") from exc
    # Keyed by the manifest's own hash: two versions may share weights but never a manifest.
    cache = (cache_dir or settings.home / "cache" / "checkpoints") / hashlib.sha256(raw).hexdigest()
    if (cache / MANIFEST).is_file() and (cache / manifest.weights_file).is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dl.", dir=cache.parent))
    try:
        client.download_file(
            loc.bucket, loc.join(manifest.weights_file).key, str(tmp / manifest.weights_file)
        )
        (tmp / MANIFEST).write_bytes(raw)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except ClientError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot download weights of {uri}: {exc}") from exc
    return cache


def load_checkpoint(uri: str | Path, settings: Settings | None = None, device: str = "cpu") -> Checkpoint:
    """Verify the checksum, then build the model and load its weights strictly."""
    import timm

    path = fetch_checkpoint(str(uri), settings)
    manifest = read_manifest(path)
    weights = path / manifest.weights_file
    if weights.is_symlink() or not weights.is_file():
        raise CheckpointError(f"weights file {manifest.weights_file} of {manifest.version} is missing")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise CheckpointError(
            f"weights sha256 mismatch for {manifest.version}: manifest says "
            f"{manifest.weights_sha256[:16]}..., file is {actual[:16]}...; refusing to load"
        )
    if not timm.is_model(manifest.arch):
        raise InvalidCheckpoint(f"{manifest.version}: unknown architecture {manifest.arch[:100]!r}")
    try:
        model = create_model(manifest.arch)
    except Exception as exc:  # timm raises several types for names it lists but cannot build
        raise InvalidCheckpoint(f"{manifest.version}: cannot build {manifest.arch!r}: {exc}") from exc
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: whatever it is, it is not our weights format
        raise InvalidCheckpoint(f"{manifest.version}: weights are not a safetensors file: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise InvalidCheckpoint(f"weights do not fit {manifest.arch}: {exc}") from exc
    model.eval().to(device)
    return Checkpoint(manifest=manifest, model=model, path=path)


def check_golden(ckpt: Checkpoint, device: str = "cpu", tolerance: float = 0.05) -> None:
    """Raise :class:`CheckpointError` if golden scores drift beyond ``tolerance`` (in probability)."""
    m = ckpt.manifest
    if not m.golden:
        raise CheckpointError(f"{m.version} has no golden reference scores")
    got = golden_logits(ckpt.model, m.crop_size, m.mean, m.std, device)
    if len(got) != len(m.golden):
        raise InvalidCheckpoint(
            f"{m.version}: model gave {len(got)} golden outputs, expected {len(m.golden)}"
        )
    if not all(math.isfinite(v) for v in got):
        # NaN compares false with every tolerance, so it must be refused before any comparison.
        raise InvalidCheckpoint(f"{m.version}: non-finite golden outputs {got}")
    want = np.array([g.logit for g in m.golden])
    drift = np.abs(sigmoid(np.array(got)) - sigmoid(want))
    if float(drift.max()) > tolerance:
        worst = m.golden[int(drift.argmax())].name
        raise CheckpointError(
            f"{m.version}: golden score drift {float(drift.max()):.4f} on {worst!r} exceeds {tolerance}"
        )


def sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The logistic function, elementwise (the one the scoring path uses); never overflows.

    A scalar gives a 0-d array: ``float(sigmoid(z))``.
    """
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def upload_checkpoint(local: Path, uri: str, settings: Settings) -> None:
    """Copy a checkpoint directory to s3:// (weights first, manifest last: readers key off the manifest)."""
    client = make_client(settings)
    loc = S3Uri.parse(uri.rstrip("/"))
    manifest = read_manifest(local)
    client.upload_file(str(local / manifest.weights_file), loc.bucket, loc.join(manifest.weights_file).key)
    client.put_object(
        Bucket=loc.bucket,
        Key=loc.join(MANIFEST).key,
        Body=json.dumps(manifest.model_dump(mode="json"), indent=2),
    )


def init_checkpoint(
    arch: str,
    out_dir: str | Path,
    *,
    crop_size: int = 224,
    num_crops: int = 1,
    aggregation: Literal["max", "mean"] = "max",
    thresholds: Thresholds | None = None,
    seed: int = 0,
    pretrained_file: str | Path | None = None,
) -> Manifest:
    """A checkpoint with random (or pretrained-backbone) weights, so everything runs without downloads."""
    from worker.scoring.model import data_config

    torch.manual_seed(seed)
    model = create_model(arch, pretrained_file=pretrained_file)
    mean, std = data_config(arch)
    return save_checkpoint(
        model,
        out_dir,
        arch=arch,
        crop_size=crop_size,
        num_crops=num_crops,
        aggregation=aggregation,
        mean=mean,
        std=std,
        thresholds=thresholds or Thresholds(),
        notes="randomly initialised"
        if pretrained_file is None
        else f"backbone from {Path(pretrained_file).name}",
    )
