"""``labels build``: production (teacher scores, model decisions, moderator overrides) into one labels table.

The table ``labels report``, ``probe``, ``train`` and ``adapt`` read, with provenance per row so a label can
be traced back: ``teacher_score`` (and, from the teacher's stream, ``teacher_model`` and ``teacher_at``); the
latest model decision's ``model_score``, ``model_version``, ``model_verdict`` and ``decided_at``; every
moderator verdict (``verdicts``: ``who:verdict@when`` oldest first, ``n_verdicts``, ``n_agree`` with the
final one) plus the last ``moderator`` and ``overridden_at``.

Rows are the teacher's items plus every item a moderator labelled; the label (``ai_score``) is the latest
override where there is one (``label_source`` ``override``), the teacher's score otherwise. Model decisions
only add provenance: a model's own scores are no label for its successor.

Decisions come from the Redis decisions stream or from a Parquet archive (a file or a folder of files with
``image_uri``, ``ai_score``, ``model_version`` and optionally ``verdict``, ``decided_at``, ``source``).

Teacher scores come from a labels table or from the ``{ns}:teacher`` Redis stream the teacher appends to
(:class:`TeacherScore` is one entry). A stream is read whole; the latest entry per image wins (a teacher that
re-scores an image supersedes itself). Malformed entries are dropped and each is reported on one line naming
the entry id, its reason and the fix, like the bad rows of a table: a few broken entries should not block a
retrain, and nobody should train without seeing them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, Field

from training.labels import COLUMNS, LabelsError, Override, is_local_path, latest_per_uri

if TYPE_CHECKING:
    from worker.delivery.store import DecisionStore

DECISION_COLUMNS = ["image_uri", "model_score", "model_version", "model_verdict", "decided_at"]


def decisions_from_store(store: DecisionStore, count: int | None = None) -> pd.DataFrame:
    """Model decisions from the ``{ns}:decisions`` stream (moderators' entries there are skipped)."""
    from worker.records import Decision

    rows = []
    for _, fields in store.r.xrange(store.keys.decisions, count=count):
        raw = fields.get("decision") or fields.get(b"decision")
        if raw is None:
            continue
        d = Decision.from_json(raw)
        if d.source != "model":
            continue
        rows.append(
            {
                "image_uri": d.image_uri,
                "model_score": d.ai_score,
                "model_version": d.model_version,
                "model_verdict": d.verdict.value,
                "decided_at": d.decided_at.isoformat(),
            }
        )
    return pd.DataFrame(rows, columns=DECISION_COLUMNS)


def decisions_from_archive(path: str | Path) -> pd.DataFrame:
    """Model decisions from a Parquet file or a folder of them (an archive of decision records)."""
    p = Path(path)
    if not p.exists():
        raise LabelsError(
            f"decisions archive not found: {p}; fix: give the archive's folder or a .parquet file"
        )
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # pyarrow raises many types for odd folders
        raise LabelsError(f"cannot read decisions archive {p}: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in ("image_uri", "ai_score") if c not in df.columns]
    if missing:
        raise LabelsError(
            f"decisions archive {p} lacks column(s) {missing}; it has {list(df.columns)[:12]}. "
            "Fix: point at the decision records' archive"
        )
    if "source" in df.columns:
        df = df[df["source"].fillna("model").astype(str) == "model"]
    out = pd.DataFrame(
        {
            "image_uri": df["image_uri"].astype(str),
            "model_score": pd.to_numeric(df["ai_score"], errors="coerce"),
            "model_version": df.get("model_version"),
            "model_verdict": df["verdict"].astype(str) if "verdict" in df else None,
            "decided_at": df["decided_at"].astype(str) if "decided_at" in df else None,
        }
    )
    return out[DECISION_COLUMNS]


# --- teacher scores from the teacher's stream ----------------------------------------------------------

TEACHER_ENTRY = (
    "image_uri (absolute path or URI), ai_score (the teacher's probability of AI, in [0, 1]), "
    "optional source, model (the teacher's name or version), group (near-duplicates share one)"
)


class TeacherScore(BaseModel):
    """One entry of the ``{ns}:teacher`` stream, e.g. ``XADD {ns}:teacher * image_uri s3://b/k.jpg
    ai_score 0.93 model teacher-v3``. Other fields are ignored (a teacher may add its own)."""

    image_uri: str = Field(min_length=1)
    ai_score: float = Field(ge=0.0, le=1.0)
    source: str | None = None
    model: str | None = None
    group: str | None = None


class TeacherEntryReason(StrEnum):
    MISSING_URI = "missing_uri"
    RELATIVE_URI = "relative_uri"
    MISSING_SCORE = "missing_score"
    SCORE_NOT_A_NUMBER = "score_not_a_number"
    SCORE_OUT_OF_RANGE = "score_out_of_range"


TEACHER_FIXES = {
    TeacherEntryReason.MISSING_URI: "write the image's absolute path or URI in the entry's image_uri field",
    TeacherEntryReason.RELATIVE_URI: "a stream has no folder to resolve against: write an absolute path or "
    "a file://, s3:// or https:// URI",
    TeacherEntryReason.MISSING_SCORE: "write the teacher's probability in the entry's ai_score field",
    TeacherEntryReason.SCORE_NOT_A_NUMBER: "write ai_score as a number in [0, 1], e.g. 0.93",
    TeacherEntryReason.SCORE_OUT_OF_RANGE: "ai_score is a probability: scale it into [0, 1]",
}


class BadTeacherEntry(BaseModel):
    stream: str
    entry: str = Field(description="the stream entry id")
    image_uri: str | None
    reason: TeacherEntryReason
    detail: str

    @property
    def fix(self) -> str:
        return TEACHER_FIXES[self.reason]

    def describe(self) -> str:
        """One line naming the entry, what is wrong and how to fix it."""
        uri = f" {self.image_uri}" if self.image_uri else ""
        return f"{self.stream} entry {self.entry}{uri}: {self.reason.value} ({self.detail}); fix: {self.fix}"


class TeacherReport(BaseModel):
    stream: str
    total: int
    valid: int = Field(description="distinct images kept")
    superseded: int = Field(0, description="entries replaced by a later entry for the same image")
    bad: list[BadTeacherEntry] = Field(default_factory=list)

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(Counter(b.reason.value for b in self.bad))


def _text(v: Any) -> str | None:
    s = v.decode(errors="replace") if isinstance(v, bytes) else None if v is None else str(v)
    return s.strip() if s is not None and s.strip() else None


def parse_teacher_entry(stream: str, entry: str, fields: Mapping[Any, Any]) -> TeacherScore | BadTeacherEntry:
    """A typed teacher score, or why this entry cannot be one."""
    f = {_text(k) or "": v for k, v in fields.items()}
    present = f"fields: {', '.join(sorted(f)) or 'none'}"
    uri, raw = _text(f.get("image_uri")), _text(f.get("ai_score"))

    def bad(reason: TeacherEntryReason, detail: str) -> BadTeacherEntry:
        return BadTeacherEntry(stream=stream, entry=entry, image_uri=uri, reason=reason, detail=detail)

    if uri is None:
        return bad(TeacherEntryReason.MISSING_URI, present)
    if is_local_path(uri) and not Path(uri).is_absolute():
        return bad(TeacherEntryReason.RELATIVE_URI, repr(uri)[:80])
    if raw is None:
        return bad(TeacherEntryReason.MISSING_SCORE, present)
    try:
        score = float(raw)
    except ValueError:
        return bad(TeacherEntryReason.SCORE_NOT_A_NUMBER, repr(raw)[:80])
    if math.isnan(score) or not 0.0 <= score <= 1.0:
        return bad(TeacherEntryReason.SCORE_OUT_OF_RANGE, raw[:80])
    return TeacherScore(
        image_uri=uri,
        ai_score=score,
        source=_text(f.get("source")),
        model=_text(f.get("model")),
        group=_text(f.get("group")),
    )


def _entry_time(entry: str) -> str | None:
    ms = entry.partition("-")[0]
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat() if ms.isdigit() else None


def teacher_from_stream(store: DecisionStore, chunk: int = 1000) -> tuple[pd.DataFrame, TeacherReport]:
    """The teacher's scores from ``{ns}:teacher`` as a validated labels table (plus ``teacher_model`` and
    ``teacher_at``, the entry's time), oldest entry first; the latest entry per image wins."""
    key = store.keys.teacher
    latest: dict[str, dict[str, Any]] = {}
    bad: list[BadTeacherEntry] = []
    total = superseded = 0
    start = "-"
    while True:
        entries = store.r.xrange(key, min=start, count=chunk)
        for raw_id, fields in entries:
            entry = _text(raw_id) or ""
            total += 1
            got = parse_teacher_entry(key, entry, fields)
            if isinstance(got, BadTeacherEntry):
                bad.append(got)
                continue
            superseded += got.image_uri in latest
            latest.pop(got.image_uri, None)  # re-inserted: the table keeps the order of the latest entries
            latest[got.image_uri] = {
                "image_uri": got.image_uri,
                "ai_score": got.ai_score,
                "split": None,
                "group": got.group or got.image_uri,
                "source": got.source or "unknown",
                "weight": 1.0,
                "teacher_score": got.ai_score,
                "label_source": "teacher",
                "teacher_model": got.model,
                "teacher_at": _entry_time(entry),
            }
        if len(entries) < chunk:
            break
        start = f"({_text(entries[-1][0])}"
    report = TeacherReport(stream=key, total=total, valid=len(latest), superseded=superseded, bad=bad)
    if total == 0:
        raise LabelsError(
            f"teacher stream {key} has no entries; fix: have the teacher XADD entries with {TEACHER_ENTRY}, "
            "or give --teacher TABLE"
        )
    if not latest:
        raise LabelsError(
            f"teacher stream {key}: none of its {total} entries is valid; first: {bad[0].describe()}"
        )
    df = pd.DataFrame(list(latest.values()), columns=[*COLUMNS, "teacher_model", "teacher_at"])
    return df, report


def build_labels(
    teacher: pd.DataFrame | None, decisions: pd.DataFrame | None, overrides: Sequence[Override]
) -> pd.DataFrame:
    """One row per image: teacher items plus overridden ones, overrides win, provenance columns filled."""
    if teacher is None and not overrides:
        raise LabelsError("nothing to build from: give a teacher table and/or overrides")
    base = teacher.copy() if teacher is not None else pd.DataFrame(columns=["image_uri", "ai_score"])
    defaults = (("split", None), ("source", "unknown"), ("weight", 1.0), ("teacher_model", None))
    for col, default in (*defaults, ("teacher_at", None)):
        if col not in base:
            base[col] = default
    if "group" not in base:
        base["group"] = base["image_uri"]
    base["teacher_score"] = base["ai_score"]
    base["label_source"] = "teacher"

    latest = latest_per_uri(overrides)
    extra = [
        {
            "image_uri": u,
            "ai_score": o.target,
            "split": None,
            "group": u,
            "source": "override",
            "weight": 1.0,
            "teacher_score": None,
            "label_source": "override",
        }
        for u, o in latest.items()
        if u not in set(base["image_uri"])
    ]
    if extra:
        base = pd.concat([base, pd.DataFrame(extra)], ignore_index=True)
    hit = base["image_uri"].isin(latest.keys())
    # a list, not Series.map: with no override an empty string-typed Series cannot go into a float column
    base.loc[hit, "ai_score"] = [latest[u].target for u in base.loc[hit, "image_uri"]]
    base.loc[hit, "label_source"] = "override"

    history: dict[str, list[Override]] = {}
    for o in overrides:
        history.setdefault(o.image_uri, []).append(o)
    prov: list[dict[str, Any]] = []
    for u in base["image_uri"]:
        hist = history.get(u, [])
        final = latest.get(u)
        prov.append(
            {
                "verdicts": "; ".join(
                    f"{o.moderator or '?'}:{o.verdict}@{o.at.isoformat() if o.at else '?'}" for o in hist
                )
                or None,
                "n_verdicts": len(hist),
                "n_agree": sum(1 for o in hist if final is not None and o.target == final.target),
                "moderator": final.moderator if final else None,
                "overridden_at": final.at.isoformat() if final and final.at else None,
                "override_model_score": final.model_score if final else None,
            }
        )
    base = pd.concat([base.reset_index(drop=True), pd.DataFrame(prov)], axis=1)

    if decisions is not None and not decisions.empty:
        last = decisions.drop_duplicates("image_uri", keep="last").set_index("image_uri")
        for col in ("model_score", "model_version", "model_verdict", "decided_at"):
            base[col] = base["image_uri"].map(last[col])
    else:
        for col in ("model_score", "model_version", "model_verdict", "decided_at"):
            base[col] = None
    # the score the moderator saw, when no decision record is at hand
    base["model_score"] = base["model_score"].fillna(base.pop("override_model_score"))
    return base


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Parquet, CSV or JSONL by suffix; written next to a temporary name and renamed into place."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df.to_parquet(tmp, index=False)
    elif suffix == ".csv":
        df.to_csv(tmp, index=False)
    elif suffix in (".jsonl", ".ndjson"):
        df.to_json(tmp, orient="records", lines=True)
    else:
        raise LabelsError(f"{path}: unknown labels format {path.suffix!r}; fix: use .parquet, .csv or .jsonl")
    os.replace(tmp, path)
