"""``moderation review`` (serve the page, manage accounts) and ``moderation labels export``."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.cli.common import build_settings, console, err, fail

review_app = typer.Typer(
    help="The moderator review page. Without a subcommand: serve it with uvicorn.",
    invoke_without_command=True,
)

RedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Decision store (default: REDIS_URL).")]
NamespaceOpt = Annotated[str | None, typer.Option(help="Redis key prefix (default: moderation).")]


@review_app.callback()
def review(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = None,
    proxy_headers: Annotated[
        bool, typer.Option(help="Trust X-Forwarded-* from --forwarded-allow-ips (behind a TLS proxy).")
    ] = False,
    forwarded_allow_ips: Annotated[
        str, typer.Option(help="Proxies whose X-Forwarded-* we trust.")
    ] = "127.0.0.1",
) -> None:
    """Serve the review page (sign-in, queue, item pages, JSON API under /api/)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from worker.delivery.store import DecisionStore
    from worker.ops.logs import configure_logging
    from worker.review.app import create_app
    from worker.review.auth import UserStoreError, load_users, users_file

    settings = build_settings(redis_url=redis_url, namespace=namespace)
    configure_logging(settings)
    redis_url = settings.require_redis("the review page and its labels read decisions from Redis")
    try:
        users = load_users(settings)
    except UserStoreError as exc:
        raise fail(str(exc)) from exc
    if not users:
        err.print(
            f"[yellow]warning:[/] no accounts yet (store: {users_file(settings)}); create one with\n"
            "  moderation review add-user NAME --role admin"
        )
    store = DecisionStore.from_url(redis_url, settings.namespace)
    try:
        store.r.ping()
    except Exception as exc:  # redis-py raises several connection error types
        raise fail(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc
    app = create_app(settings, store)
    console.print(f"review page on [bold]http://{host}:{port}/[/] (namespace {settings.namespace})")
    uvicorn.run(
        app,
        host=host,
        port=port,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
        log_level="warning",
    )


@review_app.command("add-user")
def add_user(
    name: Annotated[str, typer.Argument(help="Sign-in name (letters, digits, _ . @ -).")],
    role: Annotated[str, typer.Option(help="moderator or admin.")] = "moderator",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin (for scripts).")
    ] = False,
    token: Annotated[bool, typer.Option("--token", help="Also issue an API token (printed once).")] = False,
    no_password: Annotated[
        bool, typer.Option("--no-password", help="API token only; cannot sign in.")
    ] = False,
    users_file_opt: Annotated[
        Path | None, typer.Option("--users-file", help="User store (default: HOME/review-users.json).")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="Read the password from the first line of this file."),
    ] = None,
) -> None:
    """Add or replace an account in the user store with an argon2id password hash."""
    from pydantic import ValidationError

    from worker.review.auth import (
        Role,
        User,
        UserStoreError,
        hash_password,
        read_store,
        token_digest,
        write_user,
    )
    from worker.review.auth import users_file as default_users_file

    if role not in (r.value for r in Role):
        raise fail("--role must be moderator or admin")
    if no_password and not token:
        raise fail("--no-password needs --token, or the account could never be used")
    path = users_file_opt or default_users_file(build_settings())
    password = ""
    if not no_password:
        if password_file is not None:
            try:
                password = password_file.read_text().splitlines()[0] if password_file.stat().st_size else ""
            except OSError as exc:
                raise fail(f"cannot read --password-file {password_file}: {exc.strerror}") from None
        elif password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif not sys.stdin.isatty():
            raise fail(
                "no terminal to ask for the password; fix: pipe it with --password-stdin or pass "
                "--password-file FILE"
            )
        else:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        if len(password) < 8:
            raise fail("a password needs at least 8 characters")
    try:
        old = read_store(path).get(name)
    except UserStoreError as exc:
        raise fail(str(exc)) from exc
    issued = secrets.token_urlsafe(32) if token else None
    tokens = (*(old.tokens if old else ()), *([token_digest(issued)] if issued else []))
    try:
        user = User(
            name=name,
            hash=hash_password(password) if password else "",
            role=Role(role),
            tokens=tokens,
        )
    except ValidationError as exc:
        raise fail(f"invalid user: {exc.errors()[0]['msg']}") from exc
    write_user(path, user)
    console.print(f"{'updated' if old else 'added'} [bold]{name}[/] ({role}) in {path}")
    if issued:
        console.print("API token (shown once; send it as 'Authorization: Bearer <token>'):")
        sys.stdout.write(issued + "\n")


UsersFileOpt = Annotated[
    Path | None, typer.Option("--users-file", help="User store (default: HOME/review-users.json).")
]


def _stored_user(name: str, users_file_opt: Path | None) -> tuple[Path, Any]:
    """The store file and the named account in it, or a one-line error naming where it is defined."""
    from worker.review.auth import UserStoreError, read_store
    from worker.review.auth import users_file as default_users_file

    settings = build_settings()
    path = users_file_opt or default_users_file(settings)
    try:
        user = read_store(path).get(name)
    except UserStoreError as exc:
        raise fail(str(exc)) from exc
    if user is None:
        in_env = name in settings.review_users
        where = " (it is defined in MODERATION_REVIEW_USERS: change it there)" if in_env else ""
        raise fail(f"no account {name!r} in {path}{where}")
    return path, user


@review_app.command("disable-user")
def disable_user(
    name: Annotated[str, typer.Argument(help="The account to disable.")],
    users_file_opt: UsersFileOpt = None,
) -> None:
    """Disable an account: its password and API tokens stop working and its open sessions end at once.

    The account and its audit trail stay; ``add-user NAME`` gives it a new password.
    """
    from worker.review.auth import write_user

    path, user = _stored_user(name, users_file_opt)
    write_user(path, user.model_copy(update={"hash": "", "tokens": ()}))
    console.print(f"disabled [bold]{name}[/] in {path}: no password, no tokens, sessions ended")


@review_app.command("remove-user")
def remove_user(
    name: Annotated[str, typer.Argument(help="The account to remove.")],
    users_file_opt: UsersFileOpt = None,
) -> None:
    """Remove an account from the user store (its verdicts stay in the audit log under its name)."""
    import json
    import os
    import tempfile

    from worker.review.auth import read_store

    path, _ = _stored_user(name, users_file_opt)
    users = read_store(path)
    users.pop(name)
    body = {u.name: u.model_dump(mode="json", exclude={"name"}) for u in users.values()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    console.print(f"removed [bold]{name}[/] from {path}")


def labels_export(
    out: Annotated[Path, typer.Option("--out", "-o", help="labels.parquet or labels.csv")],
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = None,
    per_verdict: Annotated[
        bool,
        typer.Option("--per-verdict", help="One row per moderator verdict (for agreement studies)."),
    ] = False,
) -> None:
    """Write moderator overrides as a labels table for training (block -> 1.0, allow -> 0.0).

    One row per image, the latest verdict as the label, with every moderator's verdict and agreement counts.
    """
    from worker.delivery.store import DecisionStore
    from worker.review.labels import LabelsError, override_labels, write_labels

    settings = build_settings(redis_url=redis_url, namespace=namespace)
    redis_url = settings.require_redis("the review page and its labels read decisions from Redis")
    store = DecisionStore.from_url(redis_url, settings.namespace)
    df = override_labels(store, per_verdict=per_verdict)
    try:
        write_labels(df, out)
    except LabelsError as exc:
        raise fail(str(exc)) from exc
    positives = int((df["ai_score"] >= 0.5).sum()) if len(df) else 0
    what = "verdicts" if per_verdict else "labels"
    split = int((df["n_agree"] < df["n_verdicts"]).sum()) if len(df) and not per_verdict else 0
    disagreed = f"; {split} with moderators disagreeing" if split else ""
    console.print(
        f"wrote {len(df)} {what} ({positives} AI, {len(df) - positives} real{disagreed}) to [bold]{out}[/]"
    )


def register(app: typer.Typer, labels_app: typer.Typer) -> None:
    app.add_typer(review_app, name="review")
    labels_app.command("export")(labels_export)
