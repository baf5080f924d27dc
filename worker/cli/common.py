"""What every command group shares: the settings edge, one-line errors, common options and tables.

Command modules import this one and nothing else of the CLI, so the tree is one-way: ``main`` registers the
groups, the groups import ``common``.

User mistakes end in one line on stderr, ``error: <what>; <fix>``, and an exit status: 2 for a mistake in
the command line or the configuration (as click does for usage errors), 1 for a service that is not there
(Redis down, a port taken) or work that failed. :func:`one_line_error` is the table of the mistakes we
recognise; ``main`` applies it to whatever a command raises, so no command needs its own ``try``.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from worker.settings import DeviceUnavailable, RedisNotConfigured, Settings

console = Console()
err = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line whatever the width

EXIT_USAGE = 2
EXIT_FAILURE = 1


def say_error(message: str) -> None:
    """``error: message`` on stderr, never wrapped, never read as rich markup (messages carry ``[...]``)."""
    err.print(Text.assemble(("error: ", "bold red"), message))


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    say_error(message)
    return typer.Exit(code)


def env_name(field: str) -> str:
    """The environment variable of a settings field (its alias where it has one, e.g. REDIS_URL)."""
    info = Settings.model_fields.get(field)
    alias = getattr(info.validation_alias, "choices", None) if info is not None else None
    if alias:
        return str(alias[0])
    return f"MODERATION_{field.upper()}"


def settings_error_message(exc: Exception, flags: dict[str, Any] | None = None) -> str:
    """A pydantic ValidationError or SettingsError of :class:`Settings` as ``VARIABLE=value: why; fix``.

    A value the user passed as a flag is named as such instead of as its variable.
    """
    flags = flags or {}
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        info = Settings.model_fields.get(field)
        default = "" if info is None or info.is_required() else f" (default: {_default_of(field)})"
        if field in flags:  # the flag's name may differ from the field's (--processes: worker_processes)
            where = f"{first['input']!r} given on the command line for {field}"
            fix = "pass a valid value (see --help)"
        else:
            where = f"{env_name(field)}={first['input']!r}"
            fix = f"set {env_name(field)} to a valid value or unset it{default}"
        return f"{where}: {first['msg']}{more}; fix: {fix}"
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else "?"
    cause = f": {exc.__cause__}" if exc.__cause__ else ""
    return (
        f"{env_name(field)} could not be parsed{cause}; fix: give it as JSON "
        '(e.g. {"name": {...}}) or unset it'
    )


def _default_of(field: str) -> str:
    try:
        value = Settings.model_fields[field].get_default(call_default_factory=True)
    except Exception:  # a default factory that needs the environment: say nothing
        return "?"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    return "unset" if value is None else str(value)


def build_settings(**overrides: Any) -> Settings:
    """Environment first, then any flag the user actually passed; a bad value is a one-line error."""
    from pydantic_settings import SettingsError

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except (ValidationError, SettingsError) as exc:
        raise fail(settings_error_message(exc, given)) from None


# Third-party packages a role's extra brings, and that extra (the base install is the client).
_EXTRA_OF = {
    **dict.fromkeys(
        ["torch", "torchvision", "timm", "safetensors", "PIL", "numpy", "celery", "kombu"], "worker"
    ),
    **dict.fromkeys(["boto3", "botocore", "sentry_sdk", "prometheus_client", "pandas", "pyarrow"], "worker"),
    **dict.fromkeys(["c2pa", "pdqhash"], "worker"),
    **dict.fromkeys(["fastapi", "uvicorn", "standardwebhooks"], "api"),
    **dict.fromkeys(["jinja2", "multipart", "itsdangerous", "argon2"], "review"),
    **dict.fromkeys(["sklearn", "matplotlib", "tqdm"], "train"),
}


def one_line_error(exc: BaseException) -> tuple[str, int] | None:
    """The message and exit status of a user mistake or missing service; None for a bug (show it)."""
    import redis
    from pydantic_settings import SettingsError

    if isinstance(exc, (ValidationError, SettingsError)) and (
        isinstance(exc, SettingsError) or exc.title == Settings.__name__
    ):
        return settings_error_message(exc), EXIT_USAGE
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in _EXTRA_OF:
        extra = _EXTRA_OF[(exc.name or "").split(".")[0]]
        return (
            f"this command needs {exc.name}, which this install lacks; "
            f"fix: pip install 'moderation[{extra}]'",
            EXIT_USAGE,
        )
    if isinstance(exc, RedisNotConfigured):
        return str(exc), EXIT_USAGE
    if isinstance(exc, DeviceUnavailable):
        return f"{exc}; fix: pass --device cpu (or set MODERATION_DEVICE=cpu or auto)", EXIT_USAGE
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return (
            f"cannot reach Redis ({exc}); fix: start Redis or point REDIS_URL at a running one",
            EXIT_FAILURE,
        )
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"a port this command listens on is already in use ({exc.strerror}); fix: stop the other "
            "process or choose another port (--metrics-port / MODERATION_METRICS_PORT, --port)",
            EXIT_FAILURE,
        )
    return None


def serve_metrics(registry: Any, port: int) -> None:
    """Prometheus' HTTP endpoint on ``port``; a taken port is a one-line error naming the setting."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise fail(
            f"metrics port {port} is already in use; fix: choose another --metrics-port or "
            "MODERATION_METRICS_PORT, or stop the process holding it",
            EXIT_FAILURE,
        ) from None


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
    str | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="Checkpoint directory or s3:// prefix (default: MODERATION_CHECKPOINT, else the registry's "
        "current version).",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        help="Torch device: auto (cuda if present), cpu, cuda, cuda:N (default: MODERATION_DEVICE)."
    ),
]


def print_decisions(decisions: list[Any], title: str | None = None) -> None:
    """One table for all decisions."""
    console.print(decision_table(decisions, title))


def print_decision_stream(decisions: Iterable[Any], title: str | None = None) -> list[Any]:
    """Decisions as they arrive, in one table: redrawn live on a terminal, printed once when piped."""
    got: list[Any] = []
    if not console.is_terminal:
        got = list(decisions)
        if got:
            print_decisions(got, title)
        return got
    from rich.live import Live

    with Live(decision_table(got, title), console=console, auto_refresh=False) as live:
        for d in decisions:
            got.append(d)
            live.update(decision_table(got, title), refresh=True)
    return got


def decision_table(decisions: list[Any], title: str | None = None) -> Table:
    """The item column is the full item id (folded, never shortened): it is what ``moderation decisions
    ITEM`` looks up."""
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
        row: list[str | Text] = [
            Text(d.item_id),
            f"[{colours.get(d.verdict.value, 'white')}]{d.verdict.value}[/]",
            "" if d.ai_score is None else f"{d.ai_score:.3f}",
            "" if box is None else f"{box.right - box.left}px at ({box.left},{box.top})",
        ]
        if not one_model:
            row.append(d.model_version or "")
        row.append(Text("" if d.reason is None else f"{d.reason.value}: {detail}"))
        table.add_row(*row)
    return table


def failed_inputs_exit(decisions: list[Any]) -> None:
    """Exit 1 with ``error: N of M inputs failed`` when any decision is an error (scripts check $?)."""
    failed = [d for d in decisions if d.verdict.value == "error"]
    if not failed:
        return
    reasons: dict[str, int] = {}
    for d in failed:
        key = d.reason.value if d.reason else "unknown"
        reasons[key] = reasons.get(key, 0) + 1
    why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
    raise fail(
        f"{len(failed)} of {len(decisions)} input(s) failed ({why}); fix: see the reason column",
        EXIT_FAILURE,
    )


def require_redis(settings: Settings, purpose: str) -> str:
    """The Redis URL, or the one-line error (also where a command runs without :func:`main`)."""
    try:
        return settings.require_redis(purpose)
    except RedisNotConfigured as exc:
        raise fail(str(exc)) from None
