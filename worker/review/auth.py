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

from worker.keys import Keys
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


# One atomic step per sign-in attempt, for every key it is limited by (the client, the name): refuse with the
# longest wait any key still owes, else count the attempt against every key before the password is checked.
# Counting first is what makes the limit hold under concurrency: 40 simultaneous guesses see 40 increments.
_ATTEMPT = """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local wait = 0
for i, key in ipairs(KEYS) do
  local free = tonumber(ARGV[3 * i])
  local base = tonumber(ARGV[3 * i + 1])
  local cap = tonumber(ARGV[3 * i + 2])
  local n = tonumber(redis.call('HGET', key, 'n') or '0')
  local last = tonumber(redis.call('HGET', key, 'last') or '0')
  if n >= free then
    local delay = math.min(base * math.pow(2, n - free), cap)
    wait = math.max(wait, last + delay - now)
  end
end
if wait > 0 then
  return tostring(wait)
end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'n', 1)
  redis.call('HSET', key, 'last', tostring(now))
  redis.call('EXPIRE', key, ttl)
end
return '0'
"""


class LoginThrottle:
    """Bounds what an anonymous client can make the host do through ``POST /login``, shared by every process
    of the page through Redis.

    Two limits, checked and counted in one Lua step: per client address, an exponential delay after a few
    free failures (1 s, 2 s, 4 s ... up to a quarter of an hour), which is what slows a guesser down; and per
    account name, the same shape with a low ceiling (seconds), which bounds a guesser spread over many
    addresses without letting anyone lock the owner out: the owner at worst waits that ceiling. A success
    clears both. Concurrent argon2 verifies (64 MiB and a core each) are capped per process, and a request
    that cannot get a slot at once is answered 429 instead of holding a server thread.
    """

    def __init__(self, client: Any, namespace: str, settings: Settings) -> None:
        self.r = client
        self.names = Keys(namespace)
        self.settings = settings
        self.slots = threading.BoundedSemaphore(settings.review_login_concurrency)
        self._attempt = client.register_script(_ATTEMPT)

    def keys(self, address: str, name: str) -> list[str]:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]  # any text fits a key, none is echoed
        return [self.names.login_client(address), self.names.login_name(digest)]

    def attempt(self, address: str, name: str) -> float:
        """0 when this attempt may check a password (and is now counted), else seconds to wait."""
        s = self.settings
        ttl = int(max(s.review_login_max_delay_s, s.review_login_name_max_delay_s) * 4 + 3600)
        args = [
            time.time(),
            ttl,
            s.review_login_free_attempts,
            s.review_login_delay_s,
            s.review_login_max_delay_s,
            s.review_login_name_free_attempts,
            s.review_login_delay_s,
            s.review_login_name_max_delay_s,
        ]
        return max(0.0, float(self._attempt(keys=self.keys(address, name), args=args)))

    def succeeded(self, address: str, name: str) -> None:
        self.r.delete(*self.keys(address, name))


class Sessions:
    """Server-side session ids: the cookie only names one, so signing out (or an admin) can revoke it."""

    def __init__(self, client: Any, namespace: str, max_age_s: int) -> None:
        self.r = client
        self.names = Keys(namespace)
        self.max_age_s = max_age_s

    def _key(self, sid: str) -> str:
        return self.names.review_session(sid)

    def create(self, name: str) -> str:
        sid = secrets.token_urlsafe(32)
        self.r.set(self._key(sid), name, ex=self.max_age_s)
        return sid

    def user(self, sid: object) -> str | None:
        if not isinstance(sid, str) or not 20 <= len(sid) <= 100:
            return None
        raw = self.r.get(self._key(sid))
        return raw.decode() if isinstance(raw, bytes) else raw

    def revoke(self, sid: object) -> None:
        if isinstance(sid, str) and len(sid) <= 100:
            self.r.delete(self._key(sid))
