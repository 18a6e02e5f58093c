"""Build the ASGI application from already opened services."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Lifespan

from moorage.api import account, admin, health, metrics, portal, token
from moorage.api.errors import (
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    error_body,
    handle_domain_error,
)
from moorage.api.middleware import RequestMiddleware
from moorage.api.observe import RequestObserver
from moorage.api.oci import base, blobs, catalog, manifests, referrers, tags, uploads
from moorage.errors import MoorageError
from moorage.services import Services

# Order matters where paths overlap: `_catalog` before repository routes, and
# upload sessions before blobs (`.../blobs/uploads/` is not a digest).
ROUTE_MODULES = (
    base,
    catalog,
    tags,
    manifests,
    uploads,
    blobs,
    referrers,
    token,
    account,
    admin,
    portal,
    health,
    metrics,
)


def build_routes(services: Services) -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    for module in ROUTE_MODULES:
        routes.extend(module.routes(services))
    return routes


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    code = METHOD_NOT_ALLOWED if error.status_code == 405 else NOT_FOUND
    message = "method not allowed" if error.status_code == 405 else "page not found"
    return Response(
        error_body(code.code, message),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


def create_app(
    services: Services, lifespan: Lifespan[Starlette] | None = None
) -> Starlette:
    return Starlette(
        routes=build_routes(services),
        lifespan=lifespan,
        middleware=[Middleware(RequestMiddleware, observer=RequestObserver(services))],
        exception_handlers={
            MoorageError: handle_domain_error,
            HTTPException: _http_error,
        },
    )
