"""``moderation score`` and ``moderation checkpoint``: scoring files once, without a queue."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import (
    CheckpointOpt,
    DeviceOpt,
    build_settings,
    console,
    fail,
    failed_inputs_exit,
    print_decisions,
    resolve_checkpoint,
)

checkpoint_app = typer.Typer(help="Create and inspect self-describing checkpoints.", no_args_is_help=True)


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
    """Score images once, without a queue, and print one decision per input.

    Exits 1 (after printing every decision) when any input ended as an error decision, and says how many.
    """
    from worker.media.fetch import Fetcher
    from worker.ops.logs import configure_logging
    from worker.records import Event
    from worker.samples import sample_paths
    from worker.scoring.scorer import Scorer, score_events

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
    # The user named these files on the command line: they are allowed on top of MODERATION_LOCAL_ROOTS.
    fetcher = Fetcher(settings, extra_local=_named_files(refs))
    decisions = score_events(events, scorer, fetcher)
    if as_json:
        for d in decisions:
            sys.stdout.write(d.to_json() + "\n")
    else:
        print_decisions(decisions)
    failed_inputs_exit(decisions)


def _named_files(refs: list[str]) -> list[str]:
    """Local paths among ``refs`` (plain paths and file:// URIs)."""
    from worker.errors import FetchError
    from worker.media.local import path_of

    out = []
    for ref in refs:
        if "://" in ref and not ref.lower().startswith("file://"):
            continue
        try:
            out.append(path_of(ref))
        except FetchError:
            continue  # the fetcher reports it as that image's error decision
    return out


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
    seed: Annotated[
        int, typer.Option(help="Seed of the random initialisation (same seed, same weights).")
    ] = 0,
) -> None:
    """Write a randomly initialised (or pretrained-backbone) checkpoint with a full manifest."""
    from worker.errors import CheckpointError
    from worker.records import Thresholds
    from worker.scoring.checkpoint import init_checkpoint

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
    except (CheckpointError, FileNotFoundError, RuntimeError, ValueError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"wrote [bold]{out}[/] version [bold]{manifest.version}[/] ({manifest.notes})")


@checkpoint_app.command("show")
def checkpoint_show(
    path: Annotated[str, typer.Argument(help="Checkpoint directory or s3:// prefix.")],
) -> None:
    """Print a checkpoint's manifest after verifying its weights."""
    from worker.errors import CheckpointError
    from worker.scoring.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path, build_settings())
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    console.print_json(json.dumps(ckpt.manifest.model_dump(mode="json")))


def register(app: typer.Typer) -> None:
    app.command()(score)
    app.add_typer(checkpoint_app, name="checkpoint")
