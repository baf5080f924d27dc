"""``moderation api`` (serve the HTTP API; manage its tokens) and ``moderation webhooks`` (dispatch callbacks,
list and replay dead deliveries, make a signing secret)."""

from __future__ import annotations

import base64
import json
import secrets
import signal
import threading
from typing import Annotated, Any

import typer

from worker.cli.common import build_settings, console, err, fail
from worker.settings import Settings

api_app = typer.Typer(
    help="The HTTP API for producers and readers. Without a subcommand: serve it with uvicorn.",
    invoke_without_command=True,
)
token_app = typer.Typer(help="API bearer tokens (stored hashed in Redis).", no_args_is_help=True)
api_app.add_typer(token_app, name="token")
webhooks_app = typer.Typer(help="Durable, signed decision callbacks.", no_args_is_help=True)

RedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Redis (default: REDIS_URL).")]
NamespaceOpt = Annotated[str | None, typer.Option(help="Redis key prefix (default: moderation).")]


def _settings(redis_url: str | None, namespace: str | None, **extra: Any) -> Settings:
    settings = build_settings(redis_url=redis_url, namespace=namespace, **extra)
    redis_url = settings.require_redis("the API and webhooks use Redis")
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=5).ping()
    except (redis.RedisError, ValueError) as exc:
        raise fail(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc
    return settings


@api_app.callback()
def api(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Interface (default MODERATION_API_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default MODERATION_API_PORT, 8100).")] = None,
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = None,
    proxy_headers: Annotated[bool, typer.Option(help="Trust X-Forwarded-* (behind a TLS proxy).")] = False,
) -> None:
    """Serve the HTTP API (/v1/events, /v1/decisions, /v1/items, /v1/score, /healthz, /metrics, /docs)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from worker.api.app import create_app
    from worker.ops.logs import configure_logging

    settings = _settings(redis_url, namespace, api_host=host, api_port=port)
    configure_logging(settings, component="api")
    app = create_app(settings)
    if not app.state.api.tokens.list():
        err.print(
            "[yellow]warning:[/] no API tokens yet; create one with\n  moderation api token create NAME"
        )
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=proxy_headers,
    )


@api_app.command("openapi")
def openapi() -> None:
    """Print the OpenAPI document (docs/openapi.json is this output)."""
    from worker.api.app import create_app

    settings = build_settings()
    if not settings.redis_url:  # nothing connects while the document is built
        settings = settings.model_copy(update={"redis_url": "redis://127.0.0.1:6379/0"})
    print(json.dumps(create_app(settings).openapi(), indent=2, sort_keys=True))


def _tokens(redis_url: str | None, namespace: str | None) -> Any:
    import redis

    from worker.api.tokens import TokenStore

    settings = _settings(redis_url, namespace)
    assert settings.redis_url is not None
    return TokenStore(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.namespace)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who uses it (e.g. upload-pipeline).")],
    scope: Annotated[str, typer.Option(help="Comma-separated: submit, read.")] = "submit,read",
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Create a token and print it once (only its sha256 is stored)."""
    from worker.api.tokens import TokenError, parse_scopes

    try:
        token = _tokens(redis_url, namespace).create(name, parse_scopes(scope))
    except TokenError as exc:
        raise fail(str(exc)) from exc
    print(token)


@token_app.command("list")
def token_list(redis_url: RedisOpt = None, namespace: NamespaceOpt = None) -> None:
    """Token names, scopes and creation times (never the tokens)."""
    for t in _tokens(redis_url, namespace).list():
        console.print(f"{t.name}\t{','.join(s.value for s in t.scopes)}\t{t.created_at.isoformat()}")


@token_app.command("revoke")
def token_revoke(name: str, redis_url: RedisOpt = None, namespace: NamespaceOpt = None) -> None:
    """Revoke a token by name; requests with it answer 401 from now on."""
    if not _tokens(redis_url, namespace).revoke(name):
        raise fail(f"no token named {name!r} (see: moderation api token list)")
    console.print(f"revoked {name}")


# --- webhooks --------------------------------------------------------------------------------------------
@webhooks_app.command("run")
def webhooks_run(
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = None,
    threads: Annotated[int, typer.Option(min=1, help="Deliveries in flight at once.")] = 4,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
) -> None:
    """Deliver due callbacks until SIGTERM/SIGINT (as many of these, and workers, as you like)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from worker.delivery.webhook import SECRET_HELP, Dispatcher, signer
    from worker.ops.logs import configure_logging

    settings = _settings(redis_url, namespace, metrics_port=metrics_port)
    if signer(settings) is None:
        raise fail(f"no valid webhook secret: {SECRET_HELP}")
    configure_logging(settings, component="webhooks")
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=registry)
    dispatcher = Dispatcher(settings, registry, threads=threads).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    dispatcher.stop(timeout=settings.webhook_connect_timeout_s + settings.webhook_timeout_s)


@webhooks_app.command("dead")
def webhooks_dead(
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = None,
    count: Annotated[int, typer.Option(help="Entries to show at most.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Deliveries given up on (oldest first), with the reason and the last error."""
    queue = _queue(redis_url, namespace)
    for entry_id, f in queue.dead_letters(count):
        if as_json:
            print(json.dumps({"id": entry_id, **{k: v for k, v in f.items() if k != "job"}}))
        else:
            console.print(
                f"{entry_id}  {f.get('reason')}  event={f.get('event_id')}  url={f.get('url')}  "
                f"attempts={f.get('attempts')}  {f.get('detail', '')}",
                markup=False,
                highlight=False,
            )


@webhooks_app.command("replay")
def webhooks_replay(
    entry_ids: Annotated[list[str] | None, typer.Argument(help="Dead entry ids (default: all).")] = None,
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Schedule dead deliveries again from their first attempt (after fixing the secret or allow-list)."""
    n = _queue(redis_url, namespace).replay_dead(entry_ids or None)
    console.print(f"rescheduled {n} deliveries")


@webhooks_app.command("secret")
def webhooks_secret() -> None:
    """Print a new random signing secret (whsec_...) for MODERATION_WEBHOOK_SECRET and the receiver."""
    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())


def _queue(redis_url: str | None, namespace: str | None) -> Any:
    import redis

    from worker.delivery.webhook import WebhookQueue

    settings = _settings(redis_url, namespace)
    assert settings.redis_url is not None
    return WebhookQueue(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.namespace)


def register(app: typer.Typer) -> None:
    app.add_typer(api_app, name="api")
    app.add_typer(webhooks_app, name="webhooks")
