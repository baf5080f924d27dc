"""API bearer tokens with scopes, stored hashed in Redis (``{ns}:api:tokens``: sha256 of the token -> JSON).

Tokens are 256 random bits, so a plain sha256 is enough (no password stretching needed): the store never holds
a token, and a leaked store cannot be turned back into one. ``{ns}:api:token-names`` maps a name to its hash
so tokens can be listed and revoked by name.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel

from worker.keys import Keys
from worker.records import utcnow

TOKEN_PREFIX = "mod_"


class Scope(StrEnum):
    SUBMIT = "submit"
    READ = "read"


class TokenInfo(BaseModel):
    name: str
    scopes: list[Scope]
    created_at: datetime


class TokenError(ValueError):
    """A token name or scope the user gave is not acceptable."""


def parse_scopes(text: str) -> list[Scope]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise TokenError("give at least one scope: submit, read")
    try:
        return sorted({Scope(s) for s in names})
    except ValueError:
        bad = [s for s in names if s not in {x.value for x in Scope}]
        raise TokenError(f"unknown scope {bad[0]!r}; scopes are: submit, read") from None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.r: Any = client
        self.key = Keys(namespace).api_tokens
        self.names = Keys(namespace).api_token_names

    def create(self, name: str, scopes: list[Scope]) -> str:
        """A new token for ``name``; returned once, stored only as its hash."""
        if (
            not name
            or len(name) > 100
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise TokenError("a token name is 1-100 letters, digits, '-', '_' or '.'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = _digest(token)
        info = TokenInfo(name=name, scopes=scopes, created_at=utcnow())
        if not self.r.hsetnx(self.names, name, digest):
            raise TokenError(f"a token named {name!r} exists; revoke it first or pick another name")
        self.r.hset(self.key, digest, info.model_dump_json())
        return token

    def lookup(self, token: str) -> TokenInfo | None:
        raw = self.r.hget(self.key, _digest(token))
        return None if raw is None else TokenInfo.model_validate_json(raw)

    def list(self) -> list[TokenInfo]:
        return sorted(
            (TokenInfo.model_validate_json(v) for v in self.r.hgetall(self.key).values()),
            key=lambda t: t.name,
        )

    def revoke(self, name: str) -> bool:
        digest = self.r.hget(self.names, name)
        if digest is None:
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.key, digest)
        pipe.hdel(self.names, name)
        pipe.execute()
        return True
