"""`/healthz` (the process responds) and `/readyz` (database and storage respond)."""

from __future__ import annotations

import structlog
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moorage.services import Services

log = structlog.get_logger(__name__)


def routes(services: Services) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            async with services.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            log.warning(
                "readiness check failed", component="database", error=str(error)
            )
            checks["database"] = f"failed: {type(error).__name__}"
        try:
            await services.registry.driver.check()
            checks["storage"] = "ok"
        except OSError as error:
            log.warning("readiness check failed", component="storage", error=str(error))
            checks["storage"] = f"failed: {type(error).__name__}"
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(checks, status_code=200 if ready else 503)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
