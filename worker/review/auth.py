"""Who may use the review page: accounts, password hashes, API tokens, CSRF tokens and the Origin check.

Accounts come from settings (``MODERATION_REVIEW_USERS``) and a small JSON store file that
``moderation review add-user`` writes, so a deployment needs no database. Passwords are argon2id hashes
(argon2-cffi, the OWASP recommendation); API tokens are random and only their SHA-256 is stored, because a
token is already high-entropy and must be checked on every API call without argon2's deliberate cost.

Browsers get a signed session cookie (SameSite=Strict) holding the user name and a CSRF token; every form and
session-authenticated API POST must echo the token and come from our own Origin. Bearer-token API calls carry
no ambient credentials, so they need neither.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.settings import Settings

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class Role(StrEnum):
    MODERATOR = "moderator"
    ADMIN = "admin"


class User(BaseModel):
    """One account; ``tokens`` are SHA-256 hex digests of API tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$")
    hash: str = ""
    role: Role = Role.MODERATOR
    tokens: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


class UserStoreError(ValueError):
    """The user store or the users setting is malformed."""


_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so a wrong name costs as long as a wrong password."""
    return _hasher.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def users_file(settings: Settings) -> Path:
    return settings.review_users_file or settings.home / "review-users.json"


def _parse(raw: dict[str, Any], where: str) -> dict[str, User]:
    out = {}
    for name, fields in raw.items():
        if not isinstance(fields, dict):
            raise UserStoreError(f"{where}: user {name!r} must be an object with hash and role")
        try:
            out[name] = User(name=name, **fields)
        except ValidationError as exc:
            raise UserStoreError(f"{where}: user {name!r}: {exc.errors()[0]['msg']}") from exc
    return out


def read_store(path: Path) -> dict[str, User]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise UserStoreError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise UserStoreError(f"{path}: expected a JSON object of users")
    return _parse(raw, str(path))


def load_users(settings: Settings) -> dict[str, User]:
    """The store file's users, overridden by those in settings (the operator's word wins)."""
    users = read_store(users_file(settings))
    users.update(_parse(settings.review_users, "MODERATION_REVIEW_USERS"))
    return users


def write_user(path: Path, user: User) -> None:
    """Add or replace one user in the store file atomically, readable only by its owner."""
    users = read_store(path)
    users[user.name] = user
    body = {u.name: u.model_dump(mode="json", exclude={"name"}) for u in users.values()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Directory:
    """Users as the running app sees them; re-read on change so add-user needs no restart."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._path = users_file(settings)
        self._stamp: float | None = None
        self._users: dict[str, User] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            stamp = self._path.stat().st_mtime
        except FileNotFoundError:
            stamp = 0.0
        if stamp != self._stamp:
            self._users = load_users(self.settings)
            self._stamp = stamp

    def get(self, name: str) -> User | None:
        self.refresh()
        return self._users.get(name)

    def all(self) -> list[User]:
        self.refresh()
        return sorted(self._users.values(), key=lambda u: u.name)

    def authenticate(self, name: str, password: str) -> User | None:
        user = self.get(name)
        try:
            _hasher.verify(user.hash if user and user.hash else _dummy_hash(), password)
        except (VerificationError, InvalidHashError):
            return None
        return user

    def by_token(self, token: str) -> User | None:
        digest = token_digest(token)
        for user in self.all():
            if any(hmac.compare_digest(digest, t) for t in user.tokens):
                return user
        return None


def session_secret(settings: Settings) -> str:
    """The configured key, else one generated once and kept in HOME so restarts keep sessions valid."""
    if settings.review_secret_key:
        return settings.review_secret_key
    path = settings.home / "review-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(session_token: object, sent: str | None) -> bool:
    if not isinstance(session_token, str) or not sent:
        return False
    return hmac.compare_digest(session_token.encode(), str(sent).encode())  # bytes: any input compares


def origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(own: str, origin: str | None, referer: str | None, allowed: list[str]) -> bool:
    """True when the request names our own (or an allowed) origin; browsers send Origin on every POST."""
    claimed = origin if origin and origin != "null" else (origin_of(referer) if referer else None)
    if not claimed:
        return False
    ok = {own.lower().rstrip("/"), *(a.lower().rstrip("/") for a in allowed)}
    return claimed.lower().rstrip("/") in ok


def safe_next(target: str | None, default: str = "/queue") -> str:
    """Only local paths: ``next`` must not turn the sign-in page into an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


class LoginThrottle:
    """Bounds what an anonymous client can make the host do through ``POST /login``.

    Each argon2 verify costs 64 MiB and a core for a moment, and the form is reachable without an account, so
    concurrent verifies are capped, and a name with too many recent failures is turned away (HTTP 429) until
    its window passes. Per process, in memory: enough for one review host.
    """

    def __init__(self, max_concurrent: int = 2, max_failures: int = 10, window_s: float = 600.0) -> None:
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.window_s]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def locked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.max_failures for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._failures.setdefault(k, []).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
