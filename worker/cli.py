"""The one command-line entry point: ``moderation <command>``.

This module is the program's edge: it builds the settings object from flags and environment and hands it
down. It is also the only place in ``worker`` allowed to import ``training`` (lazily, for its commands).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from worker.settings import Settings

app = typer.Typer(
    name="moderation",
    help="Self-hosted AI-generated image moderation: score images, run queue workers, retrain detectors.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
checkpoint_app = typer.Typer(help="Create and inspect self-describing checkpoints.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")

console = Console()
err = Console(stderr=True)


def build_settings(**overrides: Any) -> Settings:
    """Environment first, then any flag the user actually passed."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def resolve_checkpoint(settings: Settings, explicit: str | None = None) -> str:
    """--checkpoint, else MODERATION_CHECKPOINT, else the registry's current version."""
    if explicit:
        return explicit
    if settings.checkpoint:
        return settings.checkpoint
    from worker.registry import open_registry

    current = open_registry(settings).current_uri()
    if current is None:
        raise fail(
            "no checkpoint to serve. Pass --checkpoint DIR, set MODERATION_CHECKPOINT, or create one:\n"
            "  moderation checkpoint init --out ckpt && moderation score --checkpoint ckpt IMAGE..."
        )
    return current


CheckpointOpt = Annotated[
    str | None, typer.Option("--checkpoint", "-c", help="Checkpoint directory or s3:// prefix.")
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")]


@app.command()
def score(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Paths, file://, s3:// or https:// URIs.")
    ] = None,
    checkpoint: CheckpointOpt = None,
    samples: Annotated[bool, typer.Option("--samples", help="Also score the bundled sample images.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON decision per line.")] = False,
    device: DeviceOpt = None,
    num_crops: Annotated[int | None, typer.Option(help="Crops per image (default: checkpoint's).")] = None,
    aggregation: Annotated[str | None, typer.Option(help="max or mean (default: checkpoint's).")] = None,
) -> None:
    """Score images once, without a queue, and print one decision per input."""
    from worker.fetch import Fetcher
    from worker.logs import configure_logging
    from worker.records import Event
    from worker.samples import sample_paths
    from worker.scoring import Scorer, score_events

    settings = build_settings(device=device, num_crops=num_crops, aggregation=aggregation)
    configure_logging(settings)
    refs = list(inputs or []) + ([str(p) for p in sample_paths()] if samples else [])
    if not refs:
        raise fail("nothing to score: give image paths or URIs, or --samples")
    from worker.errors import CheckpointError

    try:
        scorer = Scorer.load(resolve_checkpoint(settings, checkpoint), settings)
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    events = [Event(item_id=r, image_uri=r) for r in refs]
    decisions = score_events(events, scorer, Fetcher(settings))
    if as_json:
        for d in decisions:
            sys.stdout.write(d.to_json() + "\n")
        return
    print_decisions(decisions)


def print_decisions(decisions: list[Any], title: str | None = None) -> None:
    versions = {d.model_version for d in decisions if d.model_version}
    one_model = len(versions) <= 1  # the usual case: name it once under the table, keep the width for rows
    table = Table(title=title, caption=f"model {next(iter(versions))}" if len(versions) == 1 else None)
    table.add_column("item", overflow="fold", min_width=14, ratio=3)
    table.add_column("verdict", no_wrap=True)
    table.add_column("ai_score", justify="right", no_wrap=True)
    table.add_column("deciding crop", no_wrap=True)
    if not one_model:
        table.add_column("model", overflow="fold", min_width=12, ratio=2)
    table.add_column("reason", overflow="fold", min_width=12, ratio=2)
    colours = {"allow": "green", "review": "yellow", "block": "red", "error": "magenta"}
    for d in decisions:
        box = d.crops[d.deciding_crop].box if d.deciding_crop is not None and d.crops else None
        detail = (d.detail or "")[:60]
        row = [
            Path(d.item_id).name if "/" in d.item_id else d.item_id,
            f"[{colours.get(d.verdict.value, 'white')}]{d.verdict.value}[/]",
            "" if d.ai_score is None else f"{d.ai_score:.3f}",
            "" if box is None else f"{box.right - box.left}px at ({box.left},{box.top})",
        ]
        if not one_model:
            row.append(d.model_version or "")
        row.append("" if d.reason is None else f"{d.reason.value}: {detail}")
        table.add_row(*row)
    console.print(table)


@checkpoint_app.command("init")
def checkpoint_init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create.")] = Path("checkpoint"),
    arch: Annotated[str, typer.Option(help="timm architecture name.")] = "convnext_tiny",
    crop_size: Annotated[int, typer.Option(help="Native crop window in pixels.")] = 224,
    num_crops: Annotated[int, typer.Option(help="Crops per image at inference.")] = 1,
    aggregation: Annotated[str, typer.Option(help="max or mean over crop logits.")] = "max",
    review: Annotated[float, typer.Option(help="ai_score at or above which items go to review.")] = 0.5,
    block: Annotated[float, typer.Option(help="ai_score at or above which items are blocked.")] = 0.9,
    pretrained_file: Annotated[
        Path | None, typer.Option(help="Backbone weights file (timm-compatible state dict).")
    ] = None,
    seed: int = 0,
) -> None:
    """Write a randomly initialised (or pretrained-backbone) checkpoint with a full manifest."""
    from worker.checkpoint import init_checkpoint
    from worker.errors import CheckpointError
    from worker.records import Thresholds

    if aggregation not in ("max", "mean"):
        raise fail("--aggregation must be max or mean")
    try:
        manifest = init_checkpoint(
            arch,
            out,
            crop_size=crop_size,
            num_crops=num_crops,
            aggregation=aggregation,  # type: ignore[arg-type]
            thresholds=Thresholds(review=review, block=block),
            seed=seed,
            pretrained_file=pretrained_file,
        )
    except (CheckpointError, FileNotFoundError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"wrote [bold]{out}[/] version [bold]{manifest.version}[/] ({manifest.notes})")


@checkpoint_app.command("show")
def checkpoint_show(
    path: Annotated[str, typer.Argument(help="Checkpoint directory or s3:// prefix.")],
) -> None:
    """Print a checkpoint's manifest after verifying its weights."""
    from worker.checkpoint import load_checkpoint
    from worker.errors import CheckpointError

    try:
        ckpt = load_checkpoint(path, build_settings())
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    console.print_json(json.dumps(ckpt.manifest.model_dump(mode="json")))


# --- command groups owned by other modules (one line each; keep this block at the bottom) ---------------
# queue worker (issue 3)
from worker import cli_queue  # noqa: E402

cli_queue.register(app)

# registry and hot reload (issue 4)
from worker.cli_registry import registry_app  # noqa: E402

app.add_typer(registry_app)

# training (issue 5)
from worker import cli_training  # noqa: E402

cli_training.register(app)

# review page (issue 6)
from worker.cli_review import labels_export, review_app  # noqa: E402

app.add_typer(review_app, name="review")
cli_training.labels_app.command("export")(labels_export)  # moderation labels export

# operations (issue 7)
from worker import cli_dlq  # noqa: E402

cli_dlq.register(app)


def main() -> None:
    app()
