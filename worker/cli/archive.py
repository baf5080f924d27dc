"""``moderation archive run|once|status``: copy decisions out of Redis into hour-partitioned Parquet."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.common import build_settings, err, fail
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.delivery.archive import Archiver

archive_app = typer.Typer(
    help="The durable decision record: every decision, override and audit entry, once, as Parquet "
    "(docs/archive.md).",
    no_args_is_help=True,
)

UriOpt = Annotated[
    str | None, typer.Option("--uri", help="Folder or s3://bucket/prefix (default MODERATION_ARCHIVE_URI).")
]
BatchOpt = Annotated[int | None, typer.Option(min=1, help="Entries per part file at most.")]


def _archiver(settings: Settings, *, running: bool = False) -> Archiver:
    from worker.delivery.archive import ArchiveError, Archiver

    try:
        archiver = Archiver.from_settings(settings)
        if running:
            archiver.check_for_run()
    except ArchiveError as exc:
        raise fail(str(exc)) from None
    return archiver


@archive_app.command()
def run(
    uri: UriOpt = None,
    batch: BatchOpt = None,
    flush_s: Annotated[
        float | None, typer.Option(min=0.01, help="Longest an entry waits before its part is written.")
    ] = None,
) -> None:
    """Archive until SIGTERM/SIGINT. First signal: write and ack what is buffered, exit. Second: exit now
    (unacked entries are archived on the next start, never twice)."""
    import redis

    from worker.ops.logs import configure_logging, get_logger

    settings = build_settings(archive_uri=uri, archive_batch=batch, archive_flush_s=flush_s)
    configure_logging(settings, component="archive")
    archiver = _archiver(settings, running=True)
    log = get_logger("archive")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("archive_stop_now", signal=signal.Signals(signum).name)
            sys.exit(1)
        stop.set()
        log.info("archive_draining", signal=signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("archive_started", uri=archiver.target.uri, group=archiver.group, consumer=archiver.consumer)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        archiver.run(stop.is_set)
    except redis.ConnectionError as exc:
        raise fail(f"Redis unreachable: {exc}") from None
    except (OSError, BotoCoreError, ClientError) as exc:
        raise fail(
            f"cannot write to {archiver.target.uri}: {exc} (unacknowledged entries are archived next start)"
        ) from None
    log.info("archive_stopped")


@archive_app.command()
def once(uri: UriOpt = None, batch: BatchOpt = None) -> None:
    """Archive everything in the streams now (pending entries first) and exit: for cron and tests."""
    import redis

    from worker.ops.logs import configure_logging

    settings = build_settings(archive_uri=uri, archive_batch=batch)
    configure_logging(settings, component="archive")
    archiver = _archiver(settings)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        report = archiver.once()
    except redis.ConnectionError as exc:
        raise fail(f"Redis unreachable: {exc}") from None
    except (OSError, BotoCoreError, ClientError) as exc:
        raise fail(
            f"cannot write to {archiver.target.uri}: {exc} (nothing was acknowledged; rerun)"
        ) from None
    sys.stdout.write(
        f"archived {report.rows} entr(ies) in {report.parts} part(s) to {archiver.target.uri}"
        + (f"; {report.skipped} already archived" if report.skipped else "")
        + (f"; {report.trimmed} trimmed from the decisions stream" if report.trimmed else "")
        + "\n"
    )


@archive_app.command()
def status(uri: UriOpt = None) -> None:
    """Entries not yet archived, per stream."""
    import redis

    settings = build_settings(archive_uri=uri)
    archiver = _archiver(settings)
    try:
        lag = archiver.lag()
    except redis.ConnectionError as exc:
        raise fail(f"Redis unreachable: {exc}") from None
    for stream, n in lag.items():
        sys.stdout.write(f"{stream}\t{n} not yet archived\n")
    if not lag:
        err.print("no archive group yet")


def register(app: typer.Typer) -> None:
    app.add_typer(archive_app, name="archive")
