"""`GET /v2/<name>/tags/list` with `n` and `last` pagination."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.api.http import ORJSONResponse, page_size
from moorage.api.oci.common import repository_name
from moorage.auth.access import PULL
from moorage.errors import NameUnknownError
from moorage.services import Services


def next_link(path: str, limit: int, last: str) -> str:
    return f'<{path}?{urlencode({"n": limit, "last": last})}>; rel="next"'


def routes(services: Services) -> list[Route]:
    registry = services.registry
    guard = services.guard

    async def list_tags(request: Request) -> Response:
        name = repository_name(request)
        access = await guard.authorize(request, name, [PULL])
        if not access.visible:
            raise NameUnknownError(detail={"name": name})
        limit = page_size(request.query_params.get("n"), None)
        last = request.query_params.get("last") or None
        if limit == 0:
            await registry.list_tags(name, 0, last)
            return ORJSONResponse({"name": name, "tags": []})
        fetch = None if limit is None else limit + 1
        found = await registry.list_tags(name, fetch, last)
        headers = {}
        if limit is not None and len(found) > limit:
            found = found[:limit]
            headers["Link"] = next_link(f"/v2/{name}/tags/list", limit, found[-1])
        return ORJSONResponse({"name": name, "tags": found}, headers=headers)

    return [Route("/v2/{name:path}/tags/list", list_tags, methods=["GET"])]
