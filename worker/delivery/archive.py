"""The durable record: every decision, override and audit entry, once, as hour-partitioned Parquet.

Redis holds decisions only as long as the upload pipeline and the review page need them (records carry a
TTL); audits and the training label builder read this archive instead. The archiver is a consumer group of
its own (``archive`` by default) on the decisions stream and on the overrides audit stream, so it never
competes with other readers of those streams.

Layout, under a local folder or ``s3://bucket/prefix`` (Hive style, readable by pyarrow, DuckDB, Spark)::

    date=YYYY-MM-DD/hour=HH/<stream>-<first id>_<last id>.parquet

The hour is the UTC hour of the stream entry's id (the time Redis appended it), so an entry always lands in
the same partition however often it is delivered.

Exactly once, the rule: a row's identity is ``(stream, stream_id)``. A part file holds consecutive entries
of one stream and is named after its first and last stream id; it is written whole (temp file + rename
locally, one PUT on S3) *before* its entries are acknowledged with ``XACK``. After a crash between the write
and the ack, the entries come back to the archiver (its own pending list, or ``XAUTOCLAIM`` from a dead
replica); entries inside the id range of a part already present are acknowledged without being written
again. Should overlapping parts ever exist anyway (a hand-copied folder, a reset group), readers drop
repeated ``(stream, stream_id)`` rows: :func:`read_archive` does.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from worker.delivery.store import DecisionStore
from worker.media.s3 import S3Uri, make_client
from worker.ops.logs import get_logger

if TYPE_CHECKING:
    import pandas as pd

    from worker.settings import Settings

log = get_logger("archive")

DECISIONS = "decisions"  # stream labels: the first part of a part file's name
OVERRIDES = "overrides"

SCHEMA = pa.schema(
    [
        pa.field("stream", pa.string(), nullable=False),
        pa.field("stream_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # decision | override | audit | unparsed
        pa.field("event_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("verdict", pa.string()),
        pa.field("ai_score", pa.float64()),
        pa.field("model_version", pa.string()),
        pa.field("source", pa.string()),
        pa.field("moderator", pa.string()),
        pa.field("previous_verdict", pa.string()),
        pa.field("note", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("decided_at", pa.timestamp("us", tz="UTC")),
        pa.field("record", pa.string()),  # the whole entry as JSON: crops, thresholds, timings, future fields
    ]
)
COLUMNS = [f.name for f in SCHEMA]

_PART = re.compile(r"^(?P<stream>[a-z]+)-(?P<first>\d+-\d+)_(?P<last>\d+-\d+)\.parquet$")


class ArchiveError(RuntimeError):
    """The archive location is unusable (bad URI, unreadable part)."""


# --- stream ids and partitions -------------------------------------------------------------------------


def parse_id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def partition_of(stream_id: str) -> str:
    """``date=YYYY-MM-DD/hour=HH`` of the UTC hour Redis appended the entry in."""
    return _partition_at(datetime.fromtimestamp(parse_id(stream_id)[0] / 1000, UTC))


def _partition_at(at: datetime) -> str:
    at = (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    return f"date={at:%Y-%m-%d}/hour={at:%H}"


def part_name(stream: str, first: str, last: str) -> str:
    return f"{stream}-{first}_{last}.parquet"


def part_range(name: str) -> tuple[str, tuple[int, int], tuple[int, int]] | None:
    """(stream, first, last) of a part file name; None for anything else in the folder."""
    m = _PART.match(name)
    return None if m is None else (m["stream"], parse_id(m["first"]), parse_id(m["last"]))


# --- rows ----------------------------------------------------------------------------------------------


def _blank_none(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _score(v: Any) -> float | None:
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def _time(v: Any) -> datetime | None:
    if not v:
        return None
    try:
        at = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def row_of(stream: str, stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One archive row from one stream entry. Never raises: an entry we cannot parse is kept as ``unparsed``
    with its raw fields, so the archive loses nothing."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(stream=stream, stream_id=stream_id, record=json.dumps(fields, sort_keys=True))
    try:
        if stream == DECISIONS:
            d = json.loads(fields["decision"])
            source = str(d.get("source") or "")
            kind = fields.get("kind") or ("override" if source.startswith("moderator:") else "decision")
            row.update(
                kind=kind,
                event_id=_blank_none(d.get("event_id") or fields.get("event_id")),
                item_id=_blank_none(d.get("item_id")),
                image_uri=_blank_none(d.get("image_uri")),
                verdict=_blank_none(d.get("verdict")),
                ai_score=_score(d.get("ai_score")),
                model_version=_blank_none(d.get("model_version")),
                source=source or None,
                moderator=(source.partition(":")[2] or None) if kind == "override" else None,
                reason=_blank_none(d.get("reason")),
                detail=_blank_none(d.get("detail")),
                decided_at=_time(d.get("decided_at")),
                record=fields["decision"],
            )
        else:  # the overrides audit stream: who changed what, from what, and why
            moderator = _blank_none(fields.get("moderator"))
            row.update(
                kind="audit",
                event_id=_blank_none(fields.get("event_id")),
                item_id=_blank_none(fields.get("item_id")),
                image_uri=_blank_none(fields.get("image_uri")),
                verdict=_blank_none(fields.get("verdict")),
                ai_score=_score(fields.get("ai_score")),
                model_version=_blank_none(fields.get("model_version")),
                source=f"moderator:{moderator}" if moderator else None,
                moderator=moderator,
                previous_verdict=_blank_none(fields.get("previous_verdict")),
                note=_blank_none(fields.get("note")),
                decided_at=_time(fields.get("at")),
            )
    except (KeyError, TypeError, ValueError, AttributeError):
        row.update(kind="unparsed", event_id=_blank_none(fields.get("event_id")))
    if not row.get("kind"):
        row["kind"] = "unparsed"
    return row


def to_parquet(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# --- where parts go ------------------------------------------------------------------------------------


class Target(Protocol):
    uri: str

    def names(self, partition: str) -> list[str]: ...

    def put(self, partition: str, name: str, data: bytes) -> None: ...

    def parts(self, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]: ...


class LocalTarget:
    """A folder; a part appears whole or not at all (temp file in the same folder, fsync, rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def names(self, partition: str) -> list[str]:
        folder = self.root / partition
        return sorted(os.listdir(folder)) if folder.is_dir() else []

    def put(self, partition: str, name: str, data: bytes) -> None:
        folder = self.root / partition
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.tmp"  # hidden: pyarrow, DuckDB and read_archive skip it
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)

    def parts(self, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
        """(path under the root, bytes) of every part whose partition ``keep`` accepts."""
        if not self.root.exists():
            return
        for path in sorted(self.root.glob("date=*/hour=*/*.parquet")):
            rel = path.relative_to(self.root).as_posix()
            if part_range(path.name) is not None and (keep is None or keep(rel.rsplit("/", 1)[0])):
                yield rel, path.read_bytes()

    def clean_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove temp files a killed archiver left behind (never visible to readers); recent ones may be
        another archiver's write in progress on a shared folder."""
        n = 0
        for tmp in self.root.glob("date=*/hour=*/.*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n


class S3Target:
    """``s3://bucket/prefix``; one PUT per part, which S3 makes visible whole or not at all."""

    def __init__(self, uri: str, client: Any) -> None:
        self.base = S3Uri.parse(uri)
        self.client = client
        self.uri = uri

    def names(self, partition: str) -> list[str]:
        prefix = self.base.join(partition).key + "/"
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.base.bucket, Prefix=prefix
        ):
            out.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
        return sorted(out)

    def put(self, partition: str, name: str, data: bytes) -> None:
        key = self.base.join(partition, name).key
        self.client.put_object(Bucket=self.base.bucket, Key=key, Body=data)

    def parts(self, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
        prefix = (self.base.key.rstrip("/") + "/") if self.base.key else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.base.bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not re.match(r"^date=[^/]+/hour=[^/]+/[^/]+$", rel) or not part_range(
                    rel.rsplit("/", 1)[1]
                ):
                    continue
                if keep is None or keep(rel.rsplit("/", 1)[0]):
                    body = self.client.get_object(Bucket=self.base.bucket, Key=obj["Key"])["Body"].read()
                    yield rel, body


def open_target(uri: str, settings: Settings | None = None) -> LocalTarget | S3Target:
    """The archive at ``uri``: a folder, or s3:// (which needs the deployment's settings for the client)."""
    if uri.startswith("s3://"):
        try:
            S3Uri.parse(uri)
        except ValueError as exc:
            raise ArchiveError(str(exc)) from None
        if settings is None:
            raise ArchiveError(f"{uri}: an s3:// archive needs the S3 settings")
        return S3Target(uri, make_client(settings))
    if "://" in uri and not uri.startswith("file://"):
        raise ArchiveError(f"archive URI must be a folder or s3://bucket/prefix, not {uri!r}")
    return LocalTarget(uri.removeprefix("file://"))


# --- reading -------------------------------------------------------------------------------------------


def read_archive(
    root: str | Path,
    settings: Settings | None = None,
    *,
    kinds: Iterable[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> pd.DataFrame:
    """Every archived row, oldest first, each ``(stream, stream_id)`` once (the exactly-once rule's reader
    half). ``kinds`` keeps only some of decision, override, audit, unparsed; ``since``/``until`` (UTC,
    inclusive, to the hour) read only those partitions."""
    import pandas as pd

    lo = None if since is None else _partition_at(since)
    hi = None if until is None else _partition_at(until)
    target = open_target(str(root), settings)
    tables = []
    for rel, data in target.parts(lambda p: (lo is None or p >= lo) and (hi is None or p <= hi)):
        try:
            tables.append(pq.read_table(io.BytesIO(data), schema=SCHEMA))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ArchiveError(f"{target.uri}/{rel}: not a readable archive part ({exc})") from exc
    df = pa.concat_tables(tables).to_pandas() if tables else SCHEMA.empty_table().to_pandas()
    if kinds is not None:
        df = df[df["kind"].isin(list(kinds))]
    df = df.drop_duplicates(subset=["stream", "kind", "event_id", "stream_id"])
    order = df["stream_id"].map(parse_id)
    df = df.assign(_order=order).sort_values(["_order", "stream"], kind="stable").drop(columns="_order")
    return pd.DataFrame(df).reset_index(drop=True)


def latest_decisions(df: pd.DataFrame) -> pd.DataFrame:
    """One row per event: its last decision or override (what the event's verdict is now)."""
    d = df[df["kind"].isin(["decision", "override"])]
    return d.drop_duplicates(subset=["event_id"], keep="last").reset_index(drop=True)


def audit_overrides(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Moderator actions as the training label builder's override rows (image_uri, verdict,
    previous_verdict, ai_score, moderator, item_id, at), oldest first."""
    audit = df[df["kind"] == "audit"]
    out = []
    for r in audit.to_dict("records"):
        at = r["decided_at"]
        out.append(
            {
                "image_uri": r["image_uri"],
                "verdict": r["verdict"],
                "previous_verdict": r["previous_verdict"],
                "ai_score": r["ai_score"],
                "moderator": r["moderator"],
                "item_id": r["item_id"],
                "at": None if at is None or at != at else at.isoformat(),
            }
        )
    return out


# --- the archiver --------------------------------------------------------------------------------------


@dataclass
class ArchiveReport:
    rows: int = 0  # rows written to new parts
    parts: int = 0
    skipped: int = 0  # redelivered entries already in a part (a crash between write and ack)
    trimmed: int = 0  # decisions-stream entries dropped from Redis (archive_stream_retention_s)

    def add(self, other: ArchiveReport) -> None:
        self.rows += other.rows
        self.parts += other.parts
        self.skipped += other.skipped
        self.trimmed += other.trimmed


Entry = tuple[str, dict[str, str]]


@dataclass
class Archiver:
    """Reads the streams through its own consumer group and writes each entry to exactly one part."""

    client: Any
    target: Target
    namespace: str = "moderation"
    group: str = "archive"
    consumer: str = field(default_factory=lambda: f"archive-{socket.gethostname()}")
    batch: int = 10_000
    flush_s: float = 60.0
    claim_idle_s: float = 300.0
    read_count: int = 1000  # entries per XREADGROUP; a batch is several reads
    retention_s: float | None = None  # trim decisions-stream entries every group acked, older than this

    def __post_init__(self) -> None:
        keys = DecisionStore(self.client, self.namespace).keys
        self.streams: dict[str, str] = {DECISIONS: keys.decisions, OVERRIDES: keys.overrides}
        self.labels = {v: k for k, v in self.streams.items()}
        self._groups_ready = False

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Archiver:
        redis_url = settings.require_redis("the archiver reads the decisions stream")
        if not settings.archive_uri:
            raise ArchiveError("no archive configured: set MODERATION_ARCHIVE_URI (a folder or s3://...)")
        kwargs: dict[str, Any] = dict(
            client=redis.Redis.from_url(redis_url, decode_responses=True),
            target=open_target(settings.archive_uri, settings),
            namespace=settings.namespace,
            group=settings.archive_group,
            batch=settings.archive_batch,
            flush_s=settings.archive_flush_s,
            claim_idle_s=settings.archive_claim_idle_s,
            retention_s=settings.archive_stream_retention_s,
        )
        if settings.archive_consumer:
            kwargs["consumer"] = settings.archive_consumer
        kwargs.update(overrides)
        return cls(**kwargs)

    def check_for_run(self) -> None:
        """A long-running archiver holds entries up to ``flush_s``; others must not take them over."""
        if self.claim_idle_s < 2 * self.flush_s:
            raise ArchiveError(
                f"MODERATION_ARCHIVE_CLAIM_IDLE_S ({self.claim_idle_s:g} s) must be at least twice the "
                f"flush interval ({self.flush_s:g} s), or archivers take over each other's buffers"
            )

    # --- setup ---
    def ensure_groups(self) -> None:
        """Create the group at the start of each stream (history already there is archived too)."""
        if self._groups_ready:
            return
        for key in self.streams.values():
            try:
                self.client.xgroup_create(key, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        if isinstance(self.target, LocalTarget):
            self.target.clean_temp()
        self._groups_ready = True

    # --- one pass ---
    def recover(self) -> ArchiveReport:
        """Entries delivered before but never acked: this consumer's own (after a restart), then those a
        dead replica held past the idle time."""
        self.ensure_groups()
        report = ArchiveReport()
        for label, key in self.streams.items():
            while True:  # our own pending list, read from the start until empty
                got = self.client.xreadgroup(self.group, self.consumer, {key: "0"}, count=self.read_count)
                entries = [(i, f) for i, f in (got[0][1] if got else []) if f is not None]
                gone = [i for i, f in (got[0][1] if got else []) if f is None]  # trimmed before we read it
                if gone:
                    self.client.xack(key, self.group, *gone)
                if not entries and not gone:
                    break
                report.add(self._flush({label: entries}, redelivered=True))
        report.add(self.claim_stale())
        return report

    def claim_stale(self) -> ArchiveReport:
        """Take over and archive entries any consumer has held unacked for ``claim_idle_s`` (XAUTOCLAIM).
        Called only with nothing buffered: our own buffered entries must not be written twice."""
        report = ArchiveReport()
        for label, key in self.streams.items():
            start = "0-0"
            while True:
                reply = self.client.xautoclaim(
                    key,
                    self.group,
                    self.consumer,
                    int(self.claim_idle_s * 1000),
                    start,
                    count=self.read_count,
                )
                start, claimed = reply[0], [(i, f) for i, f in reply[1] if f is not None]
                if claimed:
                    report.add(self._flush({label: claimed}, redelivered=True))
                if start == "0-0":
                    break
        return report

    def read_new(self, count: int, block_ms: int | None) -> dict[str, list[Entry]]:
        got = self.client.xreadgroup(
            self.group, self.consumer, {k: ">" for k in self.streams.values()}, count=count, block=block_ms
        )
        out: dict[str, list[Entry]] = defaultdict(list)
        for key, entries in got or []:
            out[self.labels[key]].extend((i, f) for i, f in entries if f is not None)
        return out

    def once(self) -> ArchiveReport:
        """Archive everything there now (pending first) and return; for cron and tests."""
        report = self.recover()
        while True:
            buf: dict[str, list[Entry]] = defaultdict(list)
            n = 0
            while n < self.batch:
                got = self.read_new(min(self.read_count, self.batch - n), None)
                if not got:
                    break
                for label, entries in got.items():
                    buf[label].extend(entries)
                    n += len(entries)
            if not n:
                report.trimmed += self.trim()
                return report
            report.add(self._flush(buf, redelivered=False))

    def run(
        self, stopping: Callable[[], bool], on_flush: Callable[[ArchiveReport], None] | None = None
    ) -> None:
        """Until ``stopping()``: read, buffer up to ``batch`` entries or ``flush_s`` seconds, flush. When
        ``stopping()`` turns true, what is buffered is flushed and acked before returning (the drain).

        A failed write or a lost Redis connection is logged and retried with backoff (the entries stay in the
        pending list meanwhile); only the drain's last write lets its error out."""
        from botocore.exceptions import BotoCoreError, ClientError

        transient = (OSError, redis.RedisError, BotoCoreError, ClientError)
        buf: dict[str, list[Entry]] = defaultdict(list)
        n, first_at, last_trim, failures = 0, 0.0, 0.0, 0
        recovered, last_claim = False, time.monotonic()

        def report(r: ArchiveReport) -> None:
            if on_flush and r.rows + r.skipped:
                on_flush(r)

        while not stopping():
            try:
                if not recovered:  # first thing, and again after a failure until it succeeds
                    report(self.recover())
                    recovered, last_claim = True, time.monotonic()
                elif not n and time.monotonic() - last_claim >= self.claim_idle_s / 2:
                    report(self.claim_stale())
                    last_claim = time.monotonic()
                if n < self.batch:
                    wait = self.flush_s if not n else max(0.0, self.flush_s - (time.monotonic() - first_at))
                    block_ms = max(1, int(min(wait, 1.0) * 1000))
                    for label, entries in self.read_new(
                        min(self.read_count, self.batch - n), block_ms
                    ).items():
                        if entries and not n:
                            first_at = time.monotonic()
                        buf[label].extend(entries)
                        n += len(entries)
                if n and (n >= self.batch or time.monotonic() - first_at >= self.flush_s):
                    report(self._flush(buf, redelivered=False))
                    buf, n = defaultdict(list), 0
                if self.retention_s is not None and time.monotonic() - last_trim >= 1.0:
                    last_trim = time.monotonic()
                    self.trim()
                failures = 0
            except transient as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log.warning("archive_retry", error=f"{type(exc).__name__}: {exc}", retry_in_s=delay)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not stopping():
                    time.sleep(0.1)
        if n:
            report(self._flush(buf, redelivered=False))

    # --- the write-then-ack step ---
    def _flush(self, buf: dict[str, list[Entry]], *, redelivered: bool) -> ArchiveReport:
        report = ArchiveReport()
        for label, entries in buf.items():
            if not entries:
                continue
            by_partition: dict[str, list[Entry]] = defaultdict(list)
            for sid, fields in sorted(entries, key=lambda e: parse_id(e[0])):
                by_partition[partition_of(sid)].append((sid, fields))
            for partition, chunk in by_partition.items():
                if redelivered:
                    covered = self._covered(partition, label)
                    fresh = [e for e in chunk if not any(a <= parse_id(e[0]) <= b for a, b in covered)]
                    report.skipped += len(chunk) - len(fresh)
                    chunk = fresh
                if not chunk:
                    continue
                rows = [row_of(label, sid, fields) for sid, fields in chunk]
                self.target.put(partition, part_name(label, chunk[0][0], chunk[-1][0]), to_parquet(rows))
                report.rows += len(rows)
                report.parts += 1
            # only once every part of these entries is in place
            pipe = self.client.pipeline(transaction=False)
            ids = [sid for sid, _ in entries]
            for i in range(0, len(ids), 10_000):
                pipe.xack(self.streams[label], self.group, *ids[i : i + 10_000])
            pipe.execute()
        if report.rows or report.skipped:
            log.info("archived", rows=report.rows, parts=report.parts, skipped=report.skipped)
        return report

    def _covered(self, partition: str, label: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        out = []
        for name in self.target.names(partition):
            r = part_range(name)
            if r is not None and r[0] == label:
                out.append((r[1], r[2]))
        return out

    def trim(self) -> int:
        """Drop decisions-stream entries older than ``retention_s`` that every consumer group (this one
        included, so only archived entries) has acknowledged; the stream's MAXLEN caps it otherwise.
        Readers without a group (plain XREAD) get ``retention_s`` to read an entry. Returns how many went."""
        if self.retention_s is None:
            return 0
        key = self.streams[DECISIONS]
        floor = (int((time.time() - self.retention_s) * 1000), 0)
        for g in self.client.xinfo_groups(key):
            if int(g["pending"]):
                oldest = self.client.xpending(key, g["name"])["min"]
                floor = min(floor, parse_id(str(oldest)))
            else:
                ms, seq = parse_id(str(g["last-delivered-id"]))
                floor = min(floor, (ms, seq + 1))
        if floor <= (0, 0):
            return 0
        return int(self.client.xtrim(key, minid=f"{floor[0]}-{floor[1]}", approximate=False))

    def lag(self) -> dict[str, int]:
        """Entries not yet archived per stream (pending + never delivered), for status output."""
        self.ensure_groups()
        out = {}
        for label, key in self.streams.items():
            for g in self.client.xinfo_groups(key):
                if g["name"] == self.group:
                    out[label] = int(g.get("pending", 0)) + int(g.get("lag") or 0)
        return out
