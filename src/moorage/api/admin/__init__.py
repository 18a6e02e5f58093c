"""The admin and self-service JSON API under `/api/v1`, built on FastAPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Mount
from starlette.types import Receive, Scope, Send

from moorage.services import Services

if TYPE_CHECKING:
    from fastapi import FastAPI

PREFIX = "/api/v1"


class AdminApiOnFirstUse:
    """The admin API application, built when its first request arrives.

    FastAPI, the admin routers and their pydantic models add about 8 MiB to
    each server process, and many processes never serve an admin request.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._app: FastAPI | None = None

    def build(self) -> FastAPI:
        """Return the admin API application, building it on the first call."""
        if self._app is None:
            # Imported here so that serving registry requests never loads it.
            from moorage.api.admin.app import create_admin_api

            # NOTE: the import and build take about 0.2 s of CPU time, during
            # which this process's event loop serves no other request.
            self._app = create_admin_api(self._services)
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.build()(scope, receive, send)


def routes(services: Services) -> list[BaseRoute]:
    return [Mount(PREFIX, app=AdminApiOnFirstUse(services), name="admin_api")]
