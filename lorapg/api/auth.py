"""Who may call the REST API: ``--api-auth user:pass[,user2:pass2]`` as HTTP Basic, as in A1111.

The API starts GPU work, so it is never open without a password to anyone but the owner: when the
app is reachable by others (``--listen``, ``--share``, a non-loopback ``GRADIO_SERVER_NAME``) and no
credentials are set, credentials are generated and shown once. On a Space whose visitors are kept
apart the API stays off unless the owner sets credentials: one open API would bypass that.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import HTTPException, Request

from lorapg.config import Settings
from lorapg.errors import UserError
from lorapg.hosting.space_policy import SpacePolicy, reachable_by_others

GENERATED_USER = "api"


@dataclass(frozen=True)
class ApiAccess:
    enabled: bool
    users: tuple[tuple[str, str], ...] = ()  # empty: no password (the owner alone on loopback)
    generated_password: str | None = None  # made here; the caller shows it once
    reason: str = ""  # why the API is off


def parse_api_auth(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UserError("--api-auth must look like user:password or user1:pass1,user2:pass2.")
        pairs.append((user, password))
    return tuple(pairs)


def api_access(settings: Settings, policy: SpacePolicy, environ: Mapping[str, str] | None = None) -> ApiAccess:
    """Decide whether the API is served and with which credentials (``settings.api`` asks for it)."""
    if not settings.api:
        return ApiAccess(False, reason="the API is off; start with --api to serve it")
    if settings.api_auth:
        return ApiAccess(True, parse_api_auth(settings.api_auth))
    if policy.private_visitors:
        return ApiAccess(False, reason="visitors are kept apart here; the owner must set api_auth to open the API")
    if reachable_by_others(settings, environ):
        password = secrets.token_urlsafe(12)
        return ApiAccess(True, ((GENERATED_USER, password),), generated_password=password)
    return ApiAccess(True)


def basic_auth_check(users: tuple[tuple[str, str], ...]):
    """A FastAPI dependency: 401 with ``WWW-Authenticate: Basic`` unless the request carries a known pair."""

    def check(request: Request) -> None:
        if not users:
            return
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user, password = "", ""
        # Every pair is compared, in constant time, so timing tells nothing about which part was wrong.
        known = [
            secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
            for u, p in users
        ]
        if scheme.lower() != "basic" or not any(known):
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check
