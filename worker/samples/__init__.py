"""The bundled sample images (see samples/ATTRIBUTION.md)."""

from __future__ import annotations

import csv
from importlib.resources import files
from pathlib import Path


def sample_dir() -> Path:
    return Path(str(files("worker") / "samples"))


def sample_paths() -> list[Path]:
    return sorted(p for p in sample_dir().iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})


def sample_labels() -> dict[str, int]:
    with (sample_dir() / "labels.csv").open() as fh:
        return {row["file"]: int(row["label"]) for row in csv.DictReader(fh)}
