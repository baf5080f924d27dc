"""``moderation dlq list|replay|purge``: look at, replay and drop dead-lettered events."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from worker.cli.common import build_settings, console, err, fail, require_redis
from worker.delivery.deadletter import DeadLetter, DeadLetterQueue
from worker.delivery.store import DecisionStore

dlq_app = typer.Typer(
    help="Dead-lettered events: list them, replay them after a fix, purge the ones that cannot succeed.",
    no_args_is_help=True,
)

ReasonOpt = Annotated[
    list[str] | None, typer.Option("--reason", "-r", help="Only entries with this reason (repeatable).")
]
IdOpt = Annotated[
    list[str] | None,
    typer.Option("--id", help="Only this entry: stream id (from `dlq list`) or event id (repeatable)."),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every entry.")]


def _queue() -> DeadLetterQueue:
    settings = build_settings()
    redis_url = require_redis(settings, "dead letters live in Redis")
    return DeadLetterQueue(DecisionStore.from_url(redis_url, settings.namespace))


def _select(
    dlq: DeadLetterQueue, reason: list[str] | None, ids: list[str] | None, every: bool
) -> list[DeadLetter]:
    if not (reason or ids or every):
        raise fail("say which entries: --reason R, --id ID or --all (see `moderation dlq list`)")
    return dlq.select(reasons=reason, ids=ids, everything=every)


@dlq_app.command("list")
def list_(
    reason: ReasonOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many (oldest first).")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show dead-lettered events: stream id, reason, detail, event id, when."""
    dlq = _queue()
    letters: list[DeadLetter] = []
    for d in dlq.entries():
        if reason and d.reason not in reason:
            continue
        letters.append(d)
        if len(letters) >= limit:
            break
    if as_json:
        import json

        for d in letters:
            sys.stdout.write(json.dumps(d.summary()) + "\n")
        return
    table = Table(title=f"dead letters ({len(dlq)} in the stream)")
    for col in ("id", "reason", "event id", "item", "at", "detail"):
        table.add_column(col, overflow="fold")
    for d in letters:
        table.add_row(d.id, d.reason, d.event_id or "", d.item_id or "", d.at[:19], (d.detail or "")[:120])
    console.print(table)


@dlq_app.command()
def replay(
    reason: ReasonOpt = None,
    ids: IdOpt = None,
    every: AllOpt = False,
    force: Annotated[
        bool, typer.Option(help="Also re-send messages that are not valid events (after a schema fix).")
    ] = False,
) -> None:
    """Re-enqueue dead-lettered events (after fixing the cause); each is decided once."""
    from worker.ingress.producer import Producer

    dlq = _queue()
    letters = _select(dlq, reason, ids, every)
    if not letters:
        err.print("nothing to replay")
        return
    producer = Producer(build_settings())
    try:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("replaying", total=len(letters))
            report = dlq.replay(
                letters,
                lambda raw, urgent: producer.send_raw(raw, urgent=urgent),
                force=force,
                progress=lambda _: bar.advance(task),
            )
    finally:
        producer.close()
    console.print(f"replayed [bold]{len(report.replayed)}[/] event(s)")
    for d in report.replayed:
        sys.stdout.write(f"{d.event_id}\t{d.reason}\n")
    if report.skipped:
        err.print(
            f"[yellow]skipped {len(report.skipped)} entr(ies) that are not valid events "
            "(they would be dead-lettered again); use --force after fixing the schema, or purge them[/]"
        )


@dlq_app.command()
def purge(
    reason: ReasonOpt = None,
    ids: IdOpt = None,
    every: AllOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete dead-letter entries for good (they will never be decided)."""
    dlq = _queue()
    letters = _select(dlq, reason, ids, every)
    if not letters:
        err.print("nothing to purge")
        return
    if not yes and not typer.confirm(f"delete {len(letters)} dead-letter entr(ies) for good?"):
        raise typer.Exit(1)
    console.print(f"purged [bold]{dlq.purge(letters)}[/] entr(ies)")


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")
