"""Training commands (issue 5): ``labels report``, ``train``, ``probe``, ``evaluate``, ``gate``, ``retrain``.

Everything heavy is imported inside the commands, so ``moderation --help`` and the serving commands never
import the training package (``worker`` must not depend on ``training`` at import time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    # Imported late: worker.cli imports this module while it is itself being imported (python -m worker.cli).
    from worker.cli import fail as cli_fail

    return cli_fail(message, code)


def build_settings(**overrides: Any) -> Any:
    from worker.cli import build_settings as cli_build_settings

    return cli_build_settings(**overrides)


labels_app = typer.Typer(help="Inspect and validate labels tables.", no_args_is_help=True)

LabelsOpt = Annotated[Path, typer.Option("--labels", "-l", help="Labels table: parquet, CSV or JSONL.")]
OverridesFileOpt = Annotated[
    Path | None, typer.Option(help="Overrides exported by the review page (CSV/parquet/JSONL).")
]
FromRedisOpt = Annotated[
    bool, typer.Option("--overrides-from-redis", help="Merge the {ns}:overrides stream from REDIS_URL.")
]


def load_merged(labels: Path, overrides_file: Path | None, from_redis: bool) -> tuple[Any, Any, list[Any]]:
    """Labels with overrides applied, the validation report, and the overrides used."""
    from training.labels import LabelsError, apply_overrides, load_labels, overrides_from_file

    try:
        df, report = load_labels(labels)
        overrides = list(overrides_from_file(overrides_file)) if overrides_file else []
    except LabelsError as exc:
        raise fail(str(exc)) from exc
    if from_redis:
        overrides += redis_overrides()
    return (apply_overrides(df, overrides) if overrides else df), report, overrides


def redis_overrides() -> list[Any]:
    from training.labels import overrides_from_store
    from worker.sink import DecisionStore

    settings = build_settings()
    if not settings.redis_url:
        raise fail("--overrides-from-redis needs MODERATION_REDIS_URL (or REDIS_URL)")
    return overrides_from_store(DecisionStore.from_url(settings.redis_url, settings.namespace))


@labels_app.command("report")
def labels_report(
    labels: LabelsOpt,
    overrides_file: OverridesFileOpt = None,
    overrides_from_redis: FromRedisOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    show_bad: Annotated[int, typer.Option(help="How many bad rows to list.")] = 10,
) -> None:
    """Look before training: score distribution, imbalance and the pos_weight it implies, bad rows."""
    from training.labels import LabelsError, summarize

    df, report, _ = load_merged(labels, overrides_file, overrides_from_redis)
    try:
        summary = summarize(df)
    except LabelsError as exc:
        raise fail(f"{exc}; {report.total} rows read, {len(report.bad)} bad: {report.by_reason}") from exc
    if as_json:
        out = {"validation": report.model_dump(mode="json"), "summary": summary.model_dump(mode="json")}
        out["validation"]["by_reason"] = report.by_reason
        typer.echo(json.dumps(out, indent=2))
        return
    console.print(
        f"[bold]{summary.n}[/] valid rows of {report.total}; share ai_score < 0.1: "
        f"[bold]{summary.share_low:.1%}[/], >= 0.5: [bold]{summary.share_high:.1%}[/] "
        f"({summary.positives} positives, {summary.negatives} negatives); "
        f"pos_weight = [bold]{summary.pos_weight:.2f}[/]; overridden by moderators: {summary.overridden}"
    )
    table = Table(title="per source")
    for col in ("source", "n", "< 0.1", ">= 0.5", "positives", "mean score"):
        table.add_column(col)
    for s in summary.per_source:
        table.add_row(
            s.source,
            str(s.n),
            f"{s.share_low:.1%}",
            f"{s.share_high:.1%}",
            str(s.positives),
            f"{s.mean_score:.3f}",
        )
    console.print(table)
    console.print(f"splits: {summary.per_split}")
    if report.bad:
        console.print(f"[yellow]{len(report.bad)} bad rows dropped[/]: {report.by_reason}")
        for b in report.bad[:show_bad]:
            console.print(f"  row {b.row}: {b.reason.value} ({b.detail}) {b.image_uri or ''}")


def register(app: typer.Typer) -> None:
    """Attach the training commands to the main CLI (one call from worker/cli.py)."""
    app.add_typer(labels_app, name="labels")
