"""`GET /v2/`: the API version check, which also sends clients the login challenge."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moorage.services import Services


def routes(services: Services) -> list[Route]:
    async def version_check(request: Request) -> Response:
        await services.guard.authenticate(request)
        return JSONResponse({})

    return [Route("/v2/", version_check, methods=["GET"])]
