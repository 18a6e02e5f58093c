"""`GET /v2/_catalog`: the repositories the caller may pull, paginated."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.api.http import ORJSONResponse, page_size
from moorage.api.oci.tags import next_link
from moorage.db.schema import utcnow
from moorage.services import Services

DEFAULT_PAGE_SIZE = 100
CATALOG_SCOPE = "registry:catalog:*"


def routes(services: Services) -> list[Route]:
    guard = services.guard
    store = services.registry.store

    async def catalog(request: Request) -> Response:
        caller = await guard.authenticate(request, CATALOG_SCOPE)
        if not caller.token_allows("registry", "catalog", "*"):
            raise guard.challenge(
                request,
                CATALOG_SCOPE,
                "token does not cover the catalog",
                insufficient=True,
            )
        limit = page_size(request.query_params.get("n"), DEFAULT_PAGE_SIZE)
        assert limit is not None
        last = request.query_params.get("last") or None
        if limit == 0:
            return ORJSONResponse({"repositories": []})
        access = caller.principal.pull_filter(utcnow())
        found = await store.list_repositories(access, limit + 1, last)
        headers = {}
        if len(found) > limit:
            found = found[:limit]
            headers["Link"] = next_link("/v2/_catalog", limit, found[-1])
        return ORJSONResponse({"repositories": found}, headers=headers)

    return [Route("/v2/_catalog", catalog, methods=["GET"])]
