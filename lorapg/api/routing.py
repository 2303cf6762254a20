"""What every ``/api/v1`` router shares: HTTP Basic on every route, A1111's error shape, a 404 for unknown ids."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Depends, HTTPException

from lorapg.api.auth import ApiAccess, basic_auth_check
from lorapg.api.errors import A1111Route
from lorapg.api.models import ErrorResponse

# The error replies every /api/v1 route may give, documented once for /docs.
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 422)}


def api_router(prefix: str, tag: str, access: ApiAccess) -> APIRouter:
    """A router whose routes all ask for the API's credentials and answer errors in A1111's shape."""
    return APIRouter(
        prefix=prefix,
        tags=[tag],
        route_class=A1111Route,
        responses=ERRORS,
        dependencies=[Depends(basic_auth_check(access.users))],
    )


@contextmanager
def unknown_as_404(*kinds: type[Exception]) -> Iterator[None]:
    """Turn a service's "no such id" error (a ``UserError`` subclass elsewhere a 400) into a 404."""
    try:
        yield
    except kinds as exc:
        raise HTTPException(404, str(exc)) from None
