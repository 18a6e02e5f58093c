"""The admin and self-service JSON API under `/api/v1`, built on FastAPI."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount

from moorage.api.admin.app import PREFIX, create_admin_api
from moorage.services import Services


def routes(services: Services) -> list[BaseRoute]:
    return [Mount(PREFIX, app=create_admin_api(services), name="admin_api")]
