"""FastAPI dependencies that decide who is asking and whether a write may proceed.

Pages redirect strangers to the sign-in page; the API answers 401. Anything a session cookie authenticates
must also pass the CSRF token and Origin checks; bearer-token calls carry no ambient credentials and skip
them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from worker.review.auth import CSRF_HEADER, User, csrf_ok, new_csrf_token, same_origin
from worker.review.context import Ctx, Review

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class LoginRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to ``/login?next=...``."""

    def __init__(self, target: str) -> None:
        self.target = target


def session_user(request: Request, review: Review) -> User | None:
    """The signed-in user, re-read on every request: a session ends as soon as its account is removed or
    loses its password (``moderation review disable-user``)."""
    name = request.session.get("user")
    if not isinstance(name, str) or review.sessions.user(request.session.get("sid")) != name:
        return None  # signed out (the server-side session is gone) or never signed in
    user = review.directory.get(name)
    return user if user is not None and user.hash else None


def csrf_token(request: Request) -> str:
    """This session's token, created on first use (the sign-in form needs one before anyone signs in)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = new_csrf_token()
        request.session["csrf"] = token
    return token


def check_post(request: Request, review: Review, token: str | None) -> None:
    """Cross-site request forgery guard for anything a session cookie authenticates."""
    own = f"{request.url.scheme}://{request.url.netloc}"
    headers = request.headers
    allowed = review.settings.review_allowed_origins
    if not same_origin(own, headers.get("origin"), headers.get("referer"), allowed):
        raise HTTPException(403, "Cross-site request refused.")
    if not csrf_ok(request.session.get("csrf"), token):
        raise HTTPException(403, "Missing or wrong CSRF token: reload the page and try again.")


def page_user(request: Request, review: Ctx) -> User:
    user = session_user(request, review)
    if user is None:
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return user


def page_admin(user: Annotated[User, Depends(page_user)]) -> User:
    if not user.is_admin:
        raise HTTPException(403, "This page is for admins.")
    return user


def api_user(request: Request, review: Ctx) -> User:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        user = review.directory.by_token(token.strip()) if scheme.lower() == "bearer" and token else None
        if user is None:
            raise HTTPException(401, "Invalid API token.", headers={"WWW-Authenticate": "Bearer"})
        return user
    user = session_user(request, review)
    if user is None:
        raise HTTPException(401, "Sign in or send a bearer token.", headers={"WWW-Authenticate": "Bearer"})
    if request.method not in SAFE_METHODS:
        check_post(request, review, request.headers.get(CSRF_HEADER))
    return user


def api_admin(user: Annotated[User, Depends(api_user)]) -> User:
    if not user.is_admin:
        raise HTTPException(403, "Admins only.")
    return user


PageUser = Annotated[User, Depends(page_user)]
PageAdmin = Annotated[User, Depends(page_admin)]
ApiUser = Annotated[User, Depends(api_user)]
ApiAdmin = Annotated[User, Depends(api_admin)]
