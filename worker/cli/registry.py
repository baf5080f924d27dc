"""Registry commands: ``moderation publish | promote | rollback | models | shadow ...``.

The registry (a directory or ``s3://bucket/prefix``) is the truth about which model serves; Redis only
carries a wake-up notification to running workers and the shadow-mode setting. Every command that flips the
pointer records who did it, so ``moderation models`` can answer "who promoted this and when".
"""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from worker.lifecycle.registry import Registry
    from worker.settings import Settings

registry_app = typer.Typer(no_args_is_help=True)
shadow_app = typer.Typer(
    help="Score live traffic with a candidate version alongside current, without deciding.",
    no_args_is_help=True,
)
registry_app.add_typer(shadow_app, name="shadow")

console = Console()

RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="Registry root: a directory or s3://bucket/prefix [env MODERATION_REGISTRY; "
        "default ~/.moderation/registry]. S3 endpoint from MODERATION_S3_ENDPOINT_URL.",
        show_default=False,
    ),
]
RedisOpt = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis of the running workers [env REDIS_URL].", show_default=False),
]
ByOpt = Annotated[
    str | None, typer.Option("--by", help="Who is doing this (default user@host).", show_default=False)
]


def _settings(registry: str | None, redis_url: str | None = None) -> Settings:
    from worker.cli.common import build_settings

    return build_settings(registry=registry, redis_url=redis_url)


def _open(settings: Settings) -> Registry:
    from worker.cli.common import fail
    from worker.lifecycle.registry import open_registry

    try:
        return open_registry(settings)
    except ValueError as exc:
        raise fail(str(exc)) from exc


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _redis(settings: Settings, required: bool = False) -> Any:
    from worker.cli.common import fail

    if not settings.redis_url:
        if required:
            raise fail("shadow mode lives in the workers' Redis: pass --redis-url or set REDIS_URL")
        return None
    import redis

    return redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)


def _notify(settings: Settings, action: str, version: str | None, by: str) -> None:
    """Wake the workers; a failure is only a warning because they poll the pointer anyway."""
    from worker.cli.common import err
    from worker.lifecycle.reload import notify

    client = _redis(settings)
    if client is None:
        return
    if not notify(client, settings.namespace, action, version, by):
        err.print(
            f"[yellow]warning:[/] could not notify workers through Redis; they will pick up "
            f"{version} at their next poll (every {settings.reload_poll_s:g}s)"
        )


def _guard(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Registry errors as clear one-line failures, not tracebacks."""
    from botocore.exceptions import BotoCoreError, ClientError

    from worker.cli.common import fail
    from worker.errors import CheckpointError

    try:
        return fn(*args, **kwargs)
    except (CheckpointError, ClientError, BotoCoreError, OSError) as exc:
        raise fail(str(exc)) from exc


@registry_app.command()
def publish(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory (manifest.json + weights).")],
    promote: Annotated[bool, typer.Option("--promote", help="Also make it current.")] = False,
    registry: RegistryOpt = None,
    redis_url: RedisOpt = None,
    by: ByOpt = None,
) -> None:
    """Copy a checkpoint into the registry as an immutable version (checksum verified first)."""
    settings = _settings(registry, redis_url)
    reg = _open(settings)
    who = _who(by)
    manifest = _guard(reg.publish, directory, promote=promote, by=who)
    console.print(f"published [bold]{manifest.version}[/] to {reg.root}")
    if promote:
        console.print(f"[green]current[/] is now [bold]{manifest.version}[/]")
        _notify(settings, "promote", manifest.version, who)


@registry_app.command()
def promote(
    version: Annotated[str, typer.Argument(help="A published version (see `moderation models`).")],
    registry: RegistryOpt = None,
    redis_url: RedisOpt = None,
    by: ByOpt = None,
) -> None:
    """Point current at VERSION; running workers validate it and swap between batches."""
    settings = _settings(registry, redis_url)
    reg = _open(settings)
    who = _who(by)
    pointer = _guard(reg.promote, version, by=who)
    console.print(f"[green]current[/] is now [bold]{pointer.version}[/] (by {who})")
    _notify(settings, "promote", pointer.version, who)


@registry_app.command()
def rollback(
    registry: RegistryOpt = None,
    redis_url: RedisOpt = None,
    by: ByOpt = None,
) -> None:
    """Point current back at the version that was current before it."""
    settings = _settings(registry, redis_url)
    reg = _open(settings)
    who = _who(by)
    before = _guard(reg.current_version)
    pointer = _guard(reg.rollback, by=who)
    console.print(f"rolled back [bold]{before}[/] -> [green]current[/] is now [bold]{pointer.version}[/]")
    _notify(settings, "rollback", pointer.version, who)


@registry_app.command()
def models(
    registry: RegistryOpt = None,
    redis_url: RedisOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List published versions with metrics, the current one, and who promoted what when."""
    from worker.keys import Keys

    settings = _settings(registry, redis_url)
    reg = _open(settings)
    manifests = _guard(reg.versions)
    pointer = _guard(reg.pointer)
    refused: dict[str, Any] = {}
    client = _redis(settings)
    if client is not None:
        try:
            refused = {
                (k.decode() if isinstance(k, bytes) else k): json.loads(v)
                for k, v in client.hgetall(Keys(settings.namespace).model_refused).items()
            }
        except Exception:  # Redis is optional here: the registry alone answers the question
            refused = {}
    last_flip = {e.version: e for e in (pointer.history if pointer else [])}
    rows = []
    for m in manifests:
        flip = last_flip.get(m.version)
        rows.append(
            {
                "version": m.version,
                "arch": m.arch,
                "crop_size": m.crop_size,
                "created_at": m.created_at.isoformat(),
                "metrics": m.metrics,
                "current": pointer is not None and pointer.version == m.version,
                "promoted_by": flip.promoted_by if flip else None,
                "promoted_at": flip.promoted_at.isoformat() if flip else None,
                "action": flip.action if flip else None,
                "refused": refused.get(m.version),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no versions in {reg.root}; add one with `moderation publish DIR`")
        return
    table = Table(title=f"models in {reg.root}")
    for col in ("", "version", "arch", "created", "metrics", "last promoted", "refused by workers"):
        table.add_column(col, overflow="fold")
    for r in rows:
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items())
        promoted = f"{r['action']} by {r['promoted_by']}\n{r['promoted_at'][:19]}" if r["action"] else ""
        ref = r["refused"]
        table.add_row(
            "[green]*[/]" if r["current"] else "",
            f"[bold]{r['version']}[/]" if r["current"] else r["version"],
            f"{r['arch']} ({r['crop_size']}px)",
            r["created_at"][:19],
            metrics,
            promoted,
            f"[red]{ref['reason']}[/] ({ref['worker']})" if ref else "",
        )
    console.print(table)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@shadow_app.command("start")
def shadow_start(
    version: Annotated[str, typer.Argument(help="A published version to shadow.")],
    reset: Annotated[bool, typer.Option("--reset", help="Forget earlier statistics of VERSION.")] = False,
    registry: RegistryOpt = None,
    redis_url: RedisOpt = None,
    by: ByOpt = None,
) -> None:
    """Workers load VERSION next to current and score every batch with it too, without deciding."""
    from worker.keys import Keys

    settings = _settings(registry, redis_url)
    _guard(_open(settings).manifest, version)  # refuse typos before any worker tries to load it
    client = _redis(settings, required=True)
    keys = Keys(settings.namespace)
    if reset:
        client.delete(keys.shadow_stats(version))
    client.set(keys.shadow, version)
    _notify(settings, "shadow", version, _who(by))
    console.print(f"shadow mode on: [bold]{version}[/]; see `moderation shadow report`")


@shadow_app.command("stop")
def shadow_stop(
    redis_url: RedisOpt = None,
    by: ByOpt = None,
) -> None:
    """Stop shadow scoring (the statistics stay for the report)."""
    from worker.keys import Keys

    settings = _settings(None, redis_url)
    client = _redis(settings, required=True)
    keys = Keys(settings.namespace)
    raw = client.get(keys.shadow)
    client.delete(keys.shadow)
    _notify(settings, "shadow", None, _who(by))
    console.print("shadow mode off" + (f" (was {raw.decode()})" if raw else " (it was not on)"))


@shadow_app.command("report")
def shadow_report(
    version: Annotated[
        str | None, typer.Argument(help="Version to report (default: the one being shadowed).")
    ] = None,
    redis_url: RedisOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Agreement, score drift and latency cost of the shadow version against current."""
    from worker.cli.common import fail
    from worker.keys import Keys
    from worker.lifecycle.shadow import report

    settings = _settings(None, redis_url)
    client = _redis(settings, required=True)
    keys = Keys(settings.namespace)
    if version is None:
        raw = client.get(keys.shadow)
        if raw is None:
            raise fail("no shadow version is running; name one: `moderation shadow report VERSION`")
        version = raw.decode()
    rep = report(client, keys.shadow_stats(version), version)
    if rep is None:
        raise fail(f"no shadow statistics for {version} yet (are workers running and receiving events?)")
    if as_json:
        typer.echo(rep.model_dump_json(indent=2))
        return
    table = Table(title=f"shadow {version} vs current", show_header=False)
    table.add_column("measure")
    table.add_column("value")
    pct = "" if rep.agreement is None else f"{rep.agreement:.1%}"
    table.add_row("events compared", f"{rep.events} in {rep.batches} batches")
    table.add_row("verdict agreement", pct)
    table.add_row("mean |score diff|", _opt(rep.mean_abs_diff))
    table.add_row("p95 |score diff|", _opt(rep.p95_abs_diff))
    table.add_row("max |score diff|", _opt(rep.max_abs_diff))
    table.add_row(
        "latency cost", "" if rep.latency_ratio is None else f"{rep.latency_ratio:.2f}x current model time"
    )
    for pair, n in sorted(rep.verdicts.items()):
        live, cand = pair.split(">")
        table.add_row(f"current {live} -> shadow {cand}", str(n))
    for why, n in sorted(rep.skipped.items()):
        table.add_row(f"batches skipped ({why})", str(n))
    console.print(table)


def _opt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def register(app: typer.Typer) -> None:
    """publish, promote, rollback, models and shadow sit at the root: they are what operators type most."""
    app.add_typer(registry_app)
