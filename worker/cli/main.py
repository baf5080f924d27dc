"""The one command-line entry point: ``moderation <command>``.

This is the program's edge: it builds the root command and registers each group. Groups owned by other
packages (training) plug in through the ``moderation.cli`` entry-point group, as Celery's ``celery.commands``
do, so ``worker`` never imports them.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from worker.cli import api, dlq, queue, registry, review, score


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="moderation",
        help="Self-hosted AI-generated image moderation: score images, run queue workers, retrain detectors.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        add_completion=False,
    )
    labels_app = typer.Typer(help="Labels tables: build, report on and export them.", no_args_is_help=True)
    app.add_typer(labels_app, name="labels")
    score.register(app)
    queue.register(app)
    registry.register(app)
    review.register(app, labels_app)
    dlq.register(app)
    api.register(app)
    for plugin in entry_points(group="moderation.cli"):
        plugin.load()(app, labels_app)
    return app


app = build_app()


def main() -> None:
    app()
