"""The labels table: teacher scores plus moderator overrides, validated once at the edge.

A labels table (parquet or CSV) has ``image_uri, ai_score`` in [0, 1] and optionally ``split`` (train, val,
test), ``group`` (near-duplicates share one, so they never straddle a split), ``source`` and ``weight`` (how
many times a row is seen per training epoch: oversample a few precious new labels with 4, leave out with 0).
A relative ``image_uri`` is a path relative to the table's own folder, so a table travels with its images.
Bad rows are
dropped and reported with a typed reason rather than failing the run: a teacher export with a few NaNs should
not block a retrain, but nobody should train without seeing what was dropped. Moderator overrides win over the
teacher for their items, because a human looked at them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from worker.delivery.store import DecisionStore

REQUIRED = ("image_uri", "ai_score")
OPTIONAL = ("split", "group", "source", "weight")
SPLITS = ("train", "val", "test")
LOW, HIGH = 0.1, 0.5  # the article's "confidently real" and "flagged" cut-offs

# Moderator verdicts as training targets: anything a moderator would not allow counts as AI.
VERDICT_TARGET = {"block": 1.0, "review": 1.0, "allow": 0.0}


class LabelsError(ValueError):
    """The table cannot be used at all (missing file, unreadable, required columns absent)."""


class BadRowReason(StrEnum):
    MISSING_URI = "missing_uri"
    MISSING_SCORE = "missing_score"
    SCORE_NOT_A_NUMBER = "score_not_a_number"
    SCORE_OUT_OF_RANGE = "score_out_of_range"
    DUPLICATE_URI = "duplicate_uri"
    UNKNOWN_SPLIT = "unknown_split"
    BAD_WEIGHT = "bad_weight"


FIXES = {
    BadRowReason.MISSING_URI: "give the image's path or URI in image_uri",
    BadRowReason.MISSING_SCORE: "give ai_score (teacher probability, or 0/1 for a human label)",
    BadRowReason.SCORE_NOT_A_NUMBER: "write ai_score as a number in [0, 1]",
    BadRowReason.SCORE_OUT_OF_RANGE: "ai_score is a probability: scale it into [0, 1]",
    BadRowReason.DUPLICATE_URI: "keep one row per image; to oversample it, set its weight column (e.g. 4)",
    BadRowReason.UNKNOWN_SPLIT: "use split train, val or test, or leave it empty",
    BadRowReason.BAD_WEIGHT: "weight is a number >= 0 (times seen per epoch; empty means 1)",
}


class BadRow(BaseModel):
    row: int = Field(description="0-based row index in the input table")
    image_uri: str | None
    reason: BadRowReason
    detail: str

    @property
    def fix(self) -> str:
        return FIXES[self.reason]

    def describe(self) -> str:
        """One line naming the row (and its CSV line), what is wrong and how to fix it."""
        uri = f" {self.image_uri}" if self.image_uri else ""
        where = f"row {self.row} (CSV line {self.row + 2}){uri}"
        return f"{where}: {self.reason.value} ({self.detail}); fix: {self.fix}"


class ValidationReport(BaseModel):
    total: int
    valid: int
    bad: list[BadRow] = Field(default_factory=list)

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(Counter(b.reason.value for b in self.bad))


class Override(BaseModel):
    """One moderator action, reduced to what training needs."""

    image_uri: str
    verdict: str
    target: float = Field(ge=0.0, le=1.0)
    item_id: str | None = None
    previous_verdict: str | None = None
    model_score: float | None = None
    moderator: str | None = None
    at: datetime | None = None

    @property
    def disagreed(self) -> bool:
        """True when the moderator reversed the model (allow <-> review/block): the regression set."""
        if self.previous_verdict is None:
            return True
        prev = VERDICT_TARGET.get(self.previous_verdict)
        return prev is None or prev != self.target


class SourceSummary(BaseModel):
    source: str
    n: int
    share_low: float
    share_high: float
    positives: int
    mean_score: float


class LabelsSummary(BaseModel):
    n: int
    share_low: float = Field(description=f"share of ai_score < {LOW}")
    share_high: float = Field(description=f"share of ai_score >= {HIGH}")
    positives: int
    negatives: int
    pos_weight: float = Field(description="negatives / positives: the BCE weight that balances the classes")
    overridden: int = 0
    per_source: list[SourceSummary] = Field(default_factory=list)
    per_split: dict[str, int] = Field(default_factory=dict)


def is_local_path(uri: str) -> bool:
    return "://" not in uri


def resolve_uri(uri: str, base: Path) -> str:
    """A relative path is relative to the labels table's folder, not to wherever the command runs."""
    if not is_local_path(uri):
        return uri
    p = Path(uri).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def read_table(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise LabelsError(f"labels file not found: {p}")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if p.suffix.lower() in (".csv", ".txt"):
            return pd.read_csv(p, dtype={"image_uri": str, "split": str, "group": str, "source": str})
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            return pd.read_json(p, lines=True)
    except Exception as exc:  # pandas raises many types for corrupt files
        raise LabelsError(f"cannot read {p}: {type(exc).__name__}: {exc}") from exc
    raise LabelsError(f"{p}: unknown labels format {p.suffix!r} (use .parquet, .csv or .jsonl)")


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


COLUMNS = ["image_uri", "ai_score", "split", "group", "source", "weight", "teacher_score", "label_source"]


def validate(df: pd.DataFrame, base: Path | None = None) -> tuple[pd.DataFrame, ValidationReport]:
    """Keep the good rows (normalised columns), report every dropped one with its reason.

    ``base``: the folder relative ``image_uri`` paths are resolved against (the table's own folder).
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise LabelsError(f"labels table lacks required column(s) {missing}; it has {list(df.columns)}")
    bad: list[BadRow] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, rec in enumerate(df.to_dict("records")):
        uri: Any = rec.get("image_uri")
        raw: Any = rec.get("ai_score")
        uri_s = None if _blank(uri) else str(uri).strip()
        if uri_s is not None and base is not None:
            uri_s = resolve_uri(uri_s, base)
        if uri_s is None:
            bad.append(
                BadRow(row=i, image_uri=None, reason=BadRowReason.MISSING_URI, detail="empty image_uri")
            )
            continue
        if _blank(raw):
            bad.append(BadRow(row=i, image_uri=uri_s, reason=BadRowReason.MISSING_SCORE, detail="empty"))
            continue
        try:
            score = float(raw)
        except (TypeError, ValueError):
            bad.append(
                BadRow(row=i, image_uri=uri_s, reason=BadRowReason.SCORE_NOT_A_NUMBER, detail=repr(raw)[:80])
            )
            continue
        if not (0.0 <= score <= 1.0) or math.isnan(score):
            bad.append(
                BadRow(row=i, image_uri=uri_s, reason=BadRowReason.SCORE_OUT_OF_RANGE, detail=str(score))
            )
            continue
        split = None if _blank(rec.get("split")) else str(rec["split"]).strip().lower()
        if split is not None and split not in SPLITS:
            bad.append(
                BadRow(
                    row=i,
                    image_uri=uri_s,
                    reason=BadRowReason.UNKNOWN_SPLIT,
                    detail=f"{split!r} not in {SPLITS}",
                )
            )
            continue
        raw_w: Any = rec.get("weight")
        try:
            weight = 1.0 if _blank(raw_w) else float(raw_w)
        except (TypeError, ValueError):
            weight = math.nan
        if not (weight >= 0.0) or math.isinf(weight):
            bad.append(
                BadRow(row=i, image_uri=uri_s, reason=BadRowReason.BAD_WEIGHT, detail=repr(raw_w)[:80])
            )
            continue
        if uri_s in seen:
            bad.append(
                BadRow(row=i, image_uri=uri_s, reason=BadRowReason.DUPLICATE_URI, detail="first row kept")
            )
            continue
        seen.add(uri_s)
        rows.append(
            {
                "image_uri": uri_s,
                "ai_score": score,
                "split": split,
                "group": uri_s if _blank(rec.get("group")) else str(rec["group"]),
                "source": "unknown" if _blank(rec.get("source")) else str(rec["source"]),
                "weight": weight,
                "teacher_score": score if _blank(rec.get("teacher_score")) else _num(rec["teacher_score"]),
                "label_source": "teacher" if _blank(rec.get("label_source")) else str(rec["label_source"]),
            }
        )
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out, ValidationReport(total=len(df), valid=len(out), bad=bad)


def load_labels(path: str | Path) -> tuple[pd.DataFrame, ValidationReport]:
    """Read and validate a table; relative image paths resolve against the table's folder."""
    return validate(read_table(path), base=Path(path).resolve().parent)


# --- overrides -----------------------------------------------------------------------------------------


def override_from_fields(f: Mapping[Any, Any]) -> Override | None:
    """An override from a stream entry or an exported row; None for actions that are not labels."""
    verdict = str(f.get("verdict", "")).strip().lower()
    uri = f.get("image_uri")
    if _blank(uri):
        return None
    if verdict in VERDICT_TARGET:
        target = VERDICT_TARGET[verdict]
    elif not _blank(f.get("target")):
        target = float(f["target"])
    else:
        return None  # e.g. an "error" verdict carries no label
    # the review page's export names the model's score model_score (its ai_score is the label)
    score: Any = f.get("model_score") if "model_score" in f else f.get("ai_score")
    at: Any = f.get("at")
    return Override(
        image_uri=str(uri),
        verdict=verdict or ("block" if target >= 0.5 else "allow"),
        target=target,
        item_id=None if _blank(f.get("item_id")) else str(f["item_id"]),
        previous_verdict=None if _blank(f.get("previous_verdict")) else str(f["previous_verdict"]),
        model_score=None if _blank(score) else float(score),
        moderator=None if _blank(f.get("moderator")) else str(f["moderator"]),
        at=None if _blank(at) else pd.Timestamp(at).to_pydatetime(),
    )


def overrides_from_store(store: DecisionStore) -> list[Override]:
    """Every labelling action in the ``{ns}:overrides`` audit stream, oldest first."""
    return [o for o in (override_from_fields(f) for f in store.overrides()) if o is not None]


def overrides_from_file(path: str | Path) -> list[Override]:
    """Overrides exported by the review page: needs ``image_uri`` and ``verdict`` (or ``target``)."""
    df = read_table(path)
    if "image_uri" not in df.columns or not ({"verdict", "target"} & set(df.columns)):
        raise LabelsError(f"{path}: an overrides file needs image_uri and verdict (or target) columns")
    base = Path(path).resolve().parent
    out = [override_from_fields(r) for r in df.to_dict("records")]
    return [o.model_copy(update={"image_uri": resolve_uri(o.image_uri, base)}) for o in out if o is not None]


def latest_per_uri(overrides: Iterable[Override]) -> dict[str, Override]:
    """The last action per image wins: a moderator may correct a colleague."""
    return {o.image_uri: o for o in overrides}


def apply_overrides(
    labels: pd.DataFrame, overrides: Sequence[Override], *, add_missing: bool = True
) -> pd.DataFrame:
    """Overrides replace the teacher's score for their items; unseen items are appended (``add_missing``)."""
    latest = latest_per_uri(overrides)
    df = labels.copy()
    hit = df["image_uri"].isin(latest.keys())
    df.loc[hit, "ai_score"] = df.loc[hit, "image_uri"].map(lambda u: latest[u].target)
    df.loc[hit, "label_source"] = "override"
    if add_missing:
        known = set(df["image_uri"])
        extra = [
            {
                "image_uri": o.image_uri,
                "ai_score": o.target,
                "split": None,
                "group": o.image_uri,
                "source": "override",
                "weight": 1.0,
                "teacher_score": o.model_score,
                "label_source": "override",
            }
            for u, o in latest.items()
            if u not in known
        ]
        if extra:
            df = pd.concat([df, pd.DataFrame(extra, columns=df.columns)], ignore_index=True)
    return df


def regression_set(overrides: Sequence[Override], exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Items whose (latest) override disagreed with the model: a candidate must not get these wrong again.

    ``exclude``: image URIs the candidate was trained on (its train split); scoring a model on its own
    training items would make the check pass by construction.
    """
    seen = set(exclude)
    rows = [
        {"image_uri": o.image_uri, "ai_score": o.target, "source": "override", "group": o.image_uri}
        for o in latest_per_uri(overrides).values()
        if o.disagreed and o.image_uri not in seen
    ]
    return pd.DataFrame(rows, columns=["image_uri", "ai_score", "source", "group"])


# --- report --------------------------------------------------------------------------------------------


def pos_weight_of(scores: Iterable[float]) -> float:
    s = list(scores)
    pos = sum(1 for x in s if x >= HIGH)
    neg = len(s) - pos
    return float(neg / pos) if pos else 1.0


def summarize(df: pd.DataFrame) -> LabelsSummary:
    if df.empty:
        raise LabelsError("no valid labels left to summarise")
    s = df["ai_score"].astype(float)
    pos = int((s >= HIGH).sum())
    per_source = []
    for name, g in df.groupby("source", sort=True):
        gs = g["ai_score"].astype(float)
        per_source.append(
            SourceSummary(
                source=str(name),
                n=len(g),
                share_low=float((gs < LOW).mean()),
                share_high=float((gs >= HIGH).mean()),
                positives=int((gs >= HIGH).sum()),
                mean_score=float(gs.mean()),
            )
        )
    splits = df["split"].fillna("unassigned").value_counts().to_dict()
    return LabelsSummary(
        n=len(df),
        share_low=float((s < LOW).mean()),
        share_high=float((s >= HIGH).mean()),
        positives=pos,
        negatives=len(df) - pos,
        pos_weight=pos_weight_of(s),
        overridden=int((df["label_source"] == "override").sum()) if "label_source" in df else 0,
        per_source=per_source,
        per_split={str(k): int(v) for k, v in splits.items()},
    )


def snapshot_hash(df: pd.DataFrame) -> str:
    """A short content hash of the labels a model was trained on (stored in its manifest)."""
    import hashlib

    cols = [c for c in ("image_uri", "ai_score", "split", "group") if c in df.columns]
    data = df[cols].sort_values("image_uri").to_csv(index=False).encode()
    return hashlib.sha256(data).hexdigest()[:16]
