"""Errors on ``/sdapi/v1`` as A1111 shapes them: ``{"error", "detail", "body", "errors"}``.

``UserError`` is a 400 with its one-line message; a request that does not fit the model is a 422
naming each field; an unexpected failure is logged here and answered with a 500 that carries no
traceback. The route class below applies this to every route, so route functions stay plain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException  # FastAPI's subclasses it; the body limit raises this one

from lorapg.errors import UserError, shorten

log = logging.getLogger(__name__)


def error_reply(status: int, kind: str, message: str, detail: Any = "", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": kind, "detail": detail, "body": "", "errors": message}, status_code=status, headers=headers
    )


def describe_validation(exc: RequestValidationError) -> tuple[str, list[dict]]:
    """One line naming every field that is wrong, and the details (location and message) per field."""
    details, parts = [], []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(loc) or "body"
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            field, message = "body", "is not valid JSON; send a JSON object"
        shown = f" (got {shorten(repr(error['input']), 40)})" if "input" in error and loc else ""
        parts.append(f"{field}: {message}{shown}")
        details.append({"loc": loc, "msg": message, "type": error.get("type")})
    return "; ".join(parts) + ".", details


class A1111Route(APIRoute):
    """A route whose failures all come back as A1111's error JSON (never a traceback)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                message, details = describe_validation(exc)
                return error_reply(422, "RequestValidationError", message, details)
            except UserError as exc:
                return error_reply(400, "UserError", str(exc))
            except HTTPException as exc:
                return error_reply(exc.status_code, "HTTPException", str(exc.detail), exc.detail, exc.headers)
            except Exception as exc:  # a bug: logged with its traceback here, not sent to the client
                log.exception("%s %s failed", request.method, request.url.path)
                return error_reply(500, type(exc).__name__, "Internal error; the server log has the details.")

        return guarded
