"""The repositories the caller may pull, each with its first tags.

The list applies the same filter as the registry's `GET /v2/_catalog` for the
same credentials (`Principal.pull_filter`): a customer's accounts see the
repositories of their namespaces and grants, a personal access token sees no
more than its repository patterns allow, and nobody sees another customer's
repositories. The customer portal shows this list.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.requests import Request

from moorage.api.admin.auth import CurrentCaller, services_of
from moorage.api.admin.models import RepositoryPage, RepositoryTags
from moorage.db.schema import utcnow

router = APIRouter(prefix="/me", tags=["me"])
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Tags listed per repository. `more_tags` is true when there are more, and
# `GET /v2/NAME/tags/list` lists them all.
MAX_TAGS = 100


@router.get("/repositories", response_model=RepositoryPage)
async def list_my_repositories(
    request: Request,
    caller: CurrentCaller,
    n: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    last: Annotated[str | None, Query(max_length=255)] = None,
) -> RepositoryPage:
    """List the repositories I may pull, in lexical order after `last`, with
    up to 100 tags each; `next` is the `last` of the following page."""
    store = services_of(request).registry.store
    access = caller.principal.pull_filter(utcnow())
    names = await store.list_repositories(access, n + 1, last or None)
    following = names[n - 1] if len(names) > n else None
    listed = []
    # NOTE: one tag query per repository, so a page of 100 repositories runs
    # about 100 queries, one after another.
    for name in names[:n]:
        tags = await store.list_tags(name, MAX_TAGS + 1, None)
        if tags is None:
            continue  # Deleted since the list was read.
        listed.append(
            RepositoryTags(
                name=name, tags=tags[:MAX_TAGS], more_tags=len(tags) > MAX_TAGS
            )
        )
    return RepositoryPage(repositories=listed, next=following)
