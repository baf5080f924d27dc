"""Moderator overrides as a labels table the training pipeline reads (overrides win over the teacher).

Columns: ``image_uri, ai_score, source, group, override_verdict, moderator, at`` and, for tracing,
``verdict`` (the same as ``override_verdict``, the name the trainer's overrides reader expects),
``item_id, event_id, previous_verdict, model_version, model_score``. ``ai_score`` is the label, not the
model's score: a moderator's ``block`` (or ``review``) is 1.0, ``allow`` is 0.0. ``group`` is the item id,
so a group-aware split never puts two overrides of one item on both sides. When an image was overridden
more than once the latest word counts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from worker.delivery.store import DecisionStore
from worker.review.media import image_source

LABEL_OF = {"block": 1.0, "review": 1.0, "allow": 0.0}
COLUMNS = [
    "image_uri",
    "ai_score",
    "source",
    "group",
    "override_verdict",
    "verdict",
    "moderator",
    "at",
    "item_id",
    "event_id",
    "previous_verdict",
    "model_version",
    "model_score",
]


class LabelsError(ValueError):
    """The output path cannot hold a labels table."""


def override_labels(store: DecisionStore) -> pd.DataFrame:
    """One row per overridden image (its latest override); verdicts without a label are skipped."""
    latest: dict[str, dict[str, str]] = {}
    for entry in store.overrides():
        if entry.get("verdict") in LABEL_OF and entry.get("image_uri"):
            latest.pop(entry["image_uri"], None)  # re-insert so row order follows the latest override
            latest[entry["image_uri"]] = entry
    entries = list(latest.values())
    decisions = store.get_many([e["event_id"] for e in entries])
    rows = []
    for e, d in zip(entries, decisions, strict=True):
        rows.append(
            {
                "image_uri": e["image_uri"],
                "ai_score": LABEL_OF[e["verdict"]],
                "source": image_source(d) if d is not None else "",
                "group": e.get("item_id", ""),
                "override_verdict": e["verdict"],
                "verdict": e["verdict"],  # the name training.labels.overrides_from_file reads
                "moderator": e.get("moderator", ""),
                "at": e.get("at", ""),
                "item_id": e.get("item_id", ""),
                "event_id": e["event_id"],
                "previous_verdict": e.get("previous_verdict", ""),
                "model_version": e.get("model_version", ""),
                "model_score": float(e["ai_score"]) if e.get("ai_score") else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def write_labels(df: pd.DataFrame, out: Path) -> None:
    """Parquet or CSV by extension, written to a temporary sibling and renamed into place."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise LabelsError(f"{out}: use a .parquet or .csv file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    tmp.replace(out)
