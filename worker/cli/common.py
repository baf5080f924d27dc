"""What every command group shares: the settings edge, one-line errors, common options and tables.

Command modules import this one and nothing else of the CLI, so the tree is one-way: ``main`` registers the
groups, the groups import ``common``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from worker.settings import Settings

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
    from worker.lifecycle.registry import open_registry

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
