"""Start the registry: open services, create the first admin, serve HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import timedelta

import structlog
import uvicorn
from rich.console import Console
from starlette.applications import Starlette
from starlette.types import Lifespan

from moorage import __version__, admin
from moorage.api.app import create_app
from moorage.audit.recorder import AdminRecorder, local_actor
from moorage.audit.retention import start_retention
from moorage.config import Settings
from moorage.db.schema import utcnow
from moorage.services import Services, open_services

log = structlog.get_logger(__name__)


async def run_server(settings: Settings, console: Console) -> None:
    services = await open_services(settings)
    services.audit.start()
    retention = start_retention(services.audit, settings)
    try:
        password = (
            settings.admin_password.get_secret_value()
            if settings.admin_password
            else None
        )
        created = await admin.ensure_vendor_admin(
            services.identity,
            settings.admin_username,
            password,
            audit=AdminRecorder(services.audit, local_actor("moorage-serve")),
        )
        if created is not None:
            _announce_admin(console, created)
        config = uvicorn.Config(
            create_app(services, _closing_lifespan(services)),
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
        )
        server = uvicorn.Server(config)
        purger = asyncio.create_task(_purge_uploads_periodically(services))
        log.info(
            "starting",
            version=__version__,
            host=settings.host,
            port=settings.port,
            data_dir=str(settings.data_dir.resolve()),
            database=settings.resolved_database_url.split("://", 1)[0],
            pid=os.getpid(),
        )
        try:
            await server.serve()
        finally:
            purger.cancel()
    finally:
        if retention is not None:
            retention.cancel()
        await services.close()
        log.info("stopped")


# How often stale upload sessions are looked for.
PURGE_INTERVAL_SECONDS = 600


async def _purge_uploads_periodically(services: Services) -> None:
    expiry = timedelta(hours=services.settings.upload_expiry_hours)
    while True:
        try:
            purged = await services.registry.purge_stale_uploads(utcnow() - expiry)
        except Exception:
            log.exception("purging stale uploads failed")
        else:
            if purged:
                log.info("purged stale uploads", count=purged)
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)


def _closing_lifespan(services: Services) -> Lifespan[Starlette]:
    """Write queued audit events when uvicorn shuts down.

    uvicorn re-raises SIGTERM and SIGINT once it has stopped serving, which ends
    the process before `run_server` gets to close the services, so the audit
    log is closed here, while uvicorn still waits for the lifespan to finish.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await services.audit.close()
        log.info("audit log closed", events_written=services.audit.written)

    return lifespan


def _announce_admin(console: Console, created: admin.CreatedAccount) -> None:
    if created.password is None:
        console.print(f"vendor admin {created.login!r} created with the given password")
        return
    console.print(
        f"vendor admin created. login: {created.login}  password: {created.password}\n"
        "This password is shown once; store it now."
    )
