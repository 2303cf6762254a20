"""Request bodies on the API are refused past the upload limit (413), without reading them whole.

A declared ``Content-Length`` over the limit is answered at once, before the body is read; a body
sent without one (chunked) is counted as it arrives and refused as soon as it passes the limit.
Either way the reply is the API's JSON error shape. Starlette's own limiter (FastAPI's
``max_body_size``) is not used: when the declared length is too large it replaces whatever the
route answers with a plain-text 413, and API clients parse JSON.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorapg.api.errors import error_reply


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTPExceptions on, ``A1111Route`` shapes it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    # The words of the services' own upload checks, so a client sees one limit named one way.
    return f"The request body is over the upload limit of {limit // 2**20} MB (setting max_upload_mb); send less."


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length itself
    return None


def limit_body(app: ASGIApp, limit: int) -> ASGIApp:
    """``app`` behind a body limit of ``limit`` bytes."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > limit:
            message = too_large_message(limit)  # shaped as A1111Route shapes the chunked case's exception
            reply = error_reply(413, "HTTPException", message, message)
            await reply(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await app(scope, counted, send)

    return limited


def limit_request_bodies(routes: list[BaseRoute], limit: int | None) -> None:
    """Put every HTTP route of the API behind the limit (None: no limit, as the owner chose)."""
    if limit is None:
        return
    for route in routes:
        if isinstance(route, Route):
            route.app = limit_body(route.app, limit)
