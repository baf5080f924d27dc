"""Teacher scores from the teacher's stream: typed entries, the latest per image, bad ones named."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import redis
from redis.typing import EncodableT, FieldT

from tests.conftest import run_cli
from tests.training.helpers import invoke
from training.build import TeacherEntryReason, build_labels, teacher_from_stream
from training.labels import LabelsError, load_labels, overrides_from_store
from worker.delivery.store import DecisionStore
from worker.records import Decision, Verdict

NS = "ts"


def teach(client: redis.Redis, store: DecisionStore, **fields: str) -> str:
    """One XADD as the teacher does it; returns the entry id."""
    entry: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
    return str(client.xadd(store.keys.teacher, entry))


def test_the_latest_score_per_image_wins_and_overrides_still_win(redis_url: str, tmp_path: Path) -> None:
    store = DecisionStore.from_url(redis_url, NS)
    client = store.r
    a, b, c = (str(tmp_path / f"{n}.jpg") for n in "abc")
    teach(client, store, image_uri=a, ai_score="0.2", model="teacher-v1", source="cam")
    teach(client, store, image_uri=b, ai_score="0.9", model="teacher-v1", group="pair-1")
    later = teach(client, store, image_uri=a, ai_score="0.85", model="teacher-v2", extra="ignored")
    teach(client, store, image_uri=f"s3://bucket/{Path(c).name}", ai_score="1")
    store.write(Decision(item_id="i0", event_id="e0", image_uri=b, verdict=Verdict.BLOCK, ai_score=0.7))
    store.override("e0", Verdict.ALLOW, "ann")  # a human looked: b is real

    teacher, report = teacher_from_stream(store, chunk=2)  # several XRANGE pages
    assert (report.total, report.valid, report.superseded, report.bad) == (4, 3, 1, [])
    assert report.stream == "{ts}:teacher"
    rows = teacher.set_index("image_uri")
    assert rows.loc[a, "ai_score"] == 0.85 and rows.loc[a, "teacher_model"] == "teacher-v2"
    assert rows.loc[a, "source"] == "unknown"  # the latest entry, whole: its fields, not a merge
    assert rows.loc[b, "group"] == "pair-1" and rows.loc[b, "source"] == "unknown"
    assert str(rows.loc[a, "teacher_at"]).startswith(
        pd.Timestamp(int(later.split("-")[0]), unit="ms", tz="UTC").isoformat()[:19]
    )
    built = build_labels(teacher, None, overrides_from_store(store)).set_index("image_uri")
    assert built.loc[b, "ai_score"] == 0.0 and built.loc[b, "teacher_score"] == 0.9
    assert built.loc[b, "label_source"] == "override" and built.loc[a, "label_source"] == "teacher"

    env = {"REDIS_URL": redis_url, "MODERATION_NAMESPACE": NS}
    code, out, err = invoke(
        *("labels", "build", "-o", "labels.parquet", "--teacher-from-redis", "--overrides-from-redis"),
        cwd=tmp_path,
        env=env,
    )
    assert code == 0, err
    assert "4 teacher entries in {ts}:teacher: 3 images, 1 superseded" in out
    df, bad = load_labels(tmp_path / "labels.parquet")  # what report, probe, train and adapt read
    assert bad.bad == [] and len(df) == 3
    table = pd.read_parquet(tmp_path / "labels.parquet").set_index("image_uri")
    assert table.loc[a, "teacher_model"] == "teacher-v2" and table.loc[b, "label_source"] == "override"


def test_malformed_entries_are_dropped_each_named_with_its_fix(redis_url: str, tmp_path: Path) -> None:
    store = DecisionStore.from_url(redis_url, NS)
    good = str(tmp_path / "good.jpg")
    teach(store.r, store, image_uri=good, ai_score="0.7")
    broken = {
        teach(store.r, store, ai_score="0.5"): TeacherEntryReason.MISSING_URI,
        teach(store.r, store, image_uri="relative/x.jpg", ai_score="0.5"): TeacherEntryReason.RELATIVE_URI,
        teach(store.r, store, image_uri=good, score="0.5"): TeacherEntryReason.MISSING_SCORE,
        teach(store.r, store, image_uri=good, ai_score="high"): TeacherEntryReason.SCORE_NOT_A_NUMBER,
        teach(store.r, store, image_uri=good, ai_score="93"): TeacherEntryReason.SCORE_OUT_OF_RANGE,
        teach(store.r, store, image_uri=good, ai_score="nan"): TeacherEntryReason.SCORE_OUT_OF_RANGE,
    }
    teacher, report = teacher_from_stream(store)
    assert list(teacher["image_uri"]) == [good] and teacher["ai_score"].tolist() == [0.7]
    assert {b.entry: b.reason for b in report.bad} == broken
    [typo] = [b for b in report.bad if b.reason == TeacherEntryReason.MISSING_SCORE]
    assert "fields: image_uri, score" in typo.describe() and "ai_score field" in typo.describe()

    code, out, err = invoke(
        *("labels", "build", "-o", "labels.csv", "--teacher-from-redis"),
        cwd=tmp_path,
        env={"REDIS_URL": redis_url, "MODERATION_NAMESPACE": NS},
    )
    assert code == 0, err
    assert "6 bad teacher entries dropped" in out
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("{ts}:teacher entry ")]
    assert len(lines) == 6 and all("; fix: " in ln for ln in lines)
    for entry in broken:
        assert any(ln.startswith(f"{{ts}}:teacher entry {entry}") for ln in lines)
    assert len(pd.read_csv(tmp_path / "labels.csv")) == 1


def test_an_empty_or_all_bad_stream_and_two_teachers_are_one_line_errors(
    redis_url: str, tmp_path: Path
) -> None:
    store = DecisionStore.from_url(redis_url, NS)
    env = {"REDIS_URL": redis_url, "MODERATION_NAMESPACE": NS}
    with pytest.raises(LabelsError, match=r"has no entries; fix: have the teacher XADD"):
        teacher_from_stream(store)
    code, _, err = invoke("labels", "build", "-o", "x.csv", "--teacher-from-redis", cwd=tmp_path, env=env)
    assert code == 2 and "{ts}:teacher has no entries" in err and "Traceback" not in err
    entry = teach(store.r, store, image_uri="x.jpg", ai_score="0.5")
    code, _, err = invoke("labels", "build", "-o", "x.csv", "--teacher-from-redis", cwd=tmp_path, env=env)
    assert code == 2 and f"entry {entry} x.jpg: relative_uri" in err and len(err.strip().splitlines()) == 1
    pd.DataFrame({"image_uri": ["/a.jpg"], "ai_score": [0.1]}).to_csv(tmp_path / "t.csv", index=False)
    code, _, err = invoke(
        *("labels", "build", "-o", "x.csv", "--teacher", "t.csv", "--teacher-from-redis"),
        cwd=tmp_path,
        env=env,
    )
    assert code == 2 and "not both" in err
    done = run_cli("labels", "build", "-o", "x.csv", "--teacher-from-redis", cwd=tmp_path, REDIS_URL="")
    assert done.returncode == 2 and "fix: set REDIS_URL" in done.stderr and "Traceback" not in done.stderr


def test_the_help_documents_the_entry_format(tmp_path: Path) -> None:
    code, out, _ = invoke("labels", "build", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and "--teacher-from-redis" in text
    assert "fields: image_uri (absolute path or URI), ai_score (probability of AI, 0 to 1)" in text
