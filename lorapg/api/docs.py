"""``/openapi.json`` and ``/docs`` (Swagger UI) for the REST API's own routes, behind its Basic auth.

The schema is built from the routes ``api_routes`` returns, never from Gradio's app: Gradio's
internal routes are not the API and its own ``/openapi.json`` is switched off (app.py). The
decorator ``finish_api`` wraps ``api_routes`` so that the docs describe the final list of routes,
whichever routers are added to it, and every route gets the body limit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from lorapg import __version__
from lorapg.api.auth import ApiAccess, basic_auth_check
from lorapg.api.body_limit import limit_request_bodies, too_large_message
from lorapg.api.errors import A1111Route
from lorapg.api.models import ErrorResponse

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from lorapg.services.build import Services

TITLE = "LoRA Playground API"
DESCRIPTION = (
    "AUTOMATIC1111-compatible `/sdapi/v1` and the app's own `/api/v1`. "
    "Errors are JSON `{error, detail, body, errors}`; `errors` says what to change. "
    "Request bodies over the upload limit are refused with 413."
)
SCHEMA_PATH = "/openapi.json"
DOCS_PATH = "/docs"


def openapi_schema(routes: list[BaseRoute], access: ApiAccess, body_limit: int | None) -> dict[str, Any]:
    schema = get_openapi(title=TITLE, version=__version__, description=DESCRIPTION, routes=routes)
    errors_as_json(schema)
    if body_limit is not None:
        document_body_limit(schema, body_limit)
    if access.users:
        # Declared so Swagger UI's "Authorize" asks for the pair; the check itself is auth.py's.
        schema.setdefault("components", {})["securitySchemes"] = {"basic": {"type": "http", "scheme": "basic"}}
        schema["security"] = [{"basic": []}]
    return schema


def errors_as_json(schema: dict[str, Any]) -> None:
    """Error replies are JSON on every route (A1111Route), also on those that stream or send files.

    FastAPI documents a ``responses={404: {"model": ...}}`` under the route's own media type, so on
    an event stream or a PNG route the errors would read as ``text/event-stream`` or ``image/png``.
    """
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, reply in operation.get("responses", {}).items():
                content = reply.get("content", {})
                if status[0] in "45" and content and "application/json" not in content:
                    reply["content"] = {"application/json": next(iter(content.values()))}


def document_body_limit(schema: dict[str, Any], limit: int) -> None:
    """Every operation may answer 413 (the limit is put on all routes, not declared by each)."""
    reply = {
        "description": too_large_message(limit),
        "content": {"application/json": {"schema": ErrorResponse.model_json_schema()}},
    }
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.setdefault("responses", {}).setdefault("413", reply)


def docs_router(routes: list[BaseRoute], access: ApiAccess, body_limit: int | None) -> APIRouter:
    """The two documentation routes, with the same Basic auth as the routes they describe."""
    router = APIRouter(
        route_class=A1111Route,
        include_in_schema=False,
        dependencies=[Depends(basic_auth_check(access.users))],
    )
    schema = functools.cache(lambda: openapi_schema(routes, access, body_limit))  # routes are fixed once served

    @router.get(SCHEMA_PATH)
    def openapi() -> JSONResponse:
        return JSONResponse(schema())

    @router.get(DOCS_PATH)
    def docs() -> HTMLResponse:
        # Relative, so the page finds the schema behind a reverse proxy's path prefix too.
        return get_swagger_ui_html(openapi_url=SCHEMA_PATH.lstrip("/"), title=TITLE)

    return router


RoutesBuilder = Callable[["Services", ApiAccess], "list[BaseRoute]"]


def finish_api(build: RoutesBuilder) -> RoutesBuilder:
    """Decorates ``api_routes``: the body limit on every route, then the docs of them all, last."""

    @functools.wraps(build)
    def finished(runtime: Services, access: ApiAccess) -> list[BaseRoute]:
        limit = runtime.policy.max_upload_bytes
        routes = list(build(runtime, access))
        docs = list(docs_router(routes, access, limit).routes)
        limit_request_bodies([*routes, *docs], limit)
        return [*routes, *docs]

    return finished
