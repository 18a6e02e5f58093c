"""Start the registry: open services, create the first admin, serve HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import timedelta
from typing import Any

import structlog
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.types import Lifespan

from moorage import __version__, tls
from moorage.api.app import create_app
from moorage.audit.recorder import local_actor
from moorage.audit.retention import start_retention
from moorage.auth.throttle import LoginThrottle
from moorage.config import Settings, too_wide_proxy_warning, too_wide_trusted_proxies
from moorage.db.schema import utcnow
from moorage.logs import flush_logs
from moorage.maintenance import run_due_deletions
from moorage.services import Services, open_services
from moorage.storage.encryption.background import start_background_encryption
from moorage.storage.encryption.setup import keys_inside_data_dir
from moorage.zerocopy import ZeroCopyProtocol, size_body_threads

log = structlog.get_logger(__name__)
# Who the server's own maintenance (scheduled deletions, garbage collection)
# is recorded as in the audit trail.
SERVER_ACTOR = local_actor("moorage-server")


def run(settings: Settings) -> None:
    """Serve until stopped, in one process or in `settings.workers` processes.

    Either way this process replaces itself with `moorage.prefork`, so that the
    server runs without the command line's modules (see that module).
    """
    from moorage.prefork import exec_prefork

    exec_prefork(settings)


def warn_when_keys_sit_with_data(settings: Settings) -> None:
    """Log a warning when the key files are inside the data directory.

    Only the server logs it (and `moorage key status` prints it), so that other
    commands do not repeat it on every run.
    """
    if keys_inside_data_dir(settings):
        log.warning(
            "encryption keys are stored inside the data directory, so a copy of "
            "that directory can be decrypted; set encryption_key_dir to another "
            "disk, or use the env or pkcs11 key source",
            key_dir=str(settings.resolved_key_dir.resolve()),
        )


def warn_about_wide_trusted_proxies(settings: Settings) -> None:
    """Log a warning for each `trusted_proxies` network that is too wide."""
    for entry in too_wide_trusted_proxies(settings.trusted_proxies):
        log.warning(too_wide_proxy_warning(entry))


# glibc's mallopt parameter for the number of memory arenas.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Keep glibc from giving every worker thread its own memory arena.

    Blob chunks are read in worker threads and freed in the event loop thread;
    with an arena per thread (glibc's default is 8 per core) freed chunks
    linger in many arenas. Two arenas kept the peak resident memory of eight
    concurrent 1 GiB pulls at 140 MiB instead of 165 MiB, at the same CPU time.
    Same effect as MALLOC_ARENA_MAX=2; does nothing on other C libraries.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        return


def run_on_uvloop(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run `coroutine` on uvloop's event loop.

    uvicorn's `loop` option only applies when uvicorn creates the loop itself;
    `Server.serve` runs on whatever loop it is given, so the loop is chosen here.
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coroutine)


async def run_server(
    settings: Settings,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve on `settings.host` and `port`, or on `sockets` a parent opened.

    The database must be migrated and the first admin created already (see
    `moorage.workers.prepare_in_child`).
    """
    services = await open_services(settings, migrate_schema=False)
    services.audit.start()
    retention = start_retention(services.audit, settings)
    try:
        reloader = _tls_reloader(settings)
        config = uvicorn.Config(
            _wrap_for_tls(create_app(services, _closing_lifespan(services)), reloader),
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http=(
                tls.client_certificate_protocol(reloader.revocations)
                if reloader is not None and settings.tls_client_ca
                else ZeroCopyProtocol
            ),
            # The registry has no WebSocket routes. With "auto", each worker
            # imported the websockets package, about 1 MiB, without using it.
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
            ssl_context_factory=(
                (lambda _config, _default: reloader.context) if reloader else None
            ),
        )
        size_body_threads(settings.workers)
        server = uvicorn.Server(config)
        purger = asyncio.create_task(_purge_periodically(services))
        collector = _start_garbage_collection(services)
        log.info(
            "starting",
            version=__version__,
            host=settings.host,
            port=settings.port,
            data_dir=str(settings.data_dir.resolve()),
            database=settings.resolved_database_url.split("://", 1)[0],
            pid=os.getpid(),
            tls=reloader is not None,
        )
        if not settings.audit_request_events:
            log.warning(
                "request events are not audited: audit_request_events is false, "
                "a setting for measurements only; remove it to record pulls, "
                "pushes and logins again"
            )
        watcher = _start_tls_watch(reloader, settings.tls_reload_seconds)
        converter = start_background_encryption(
            services.registry.driver, services.registry.store
        )
        try:
            await server.serve(sockets=sockets)
        finally:
            for task in (purger, watcher, converter, collector):
                if task is not None:
                    task.cancel()
    finally:
        if retention is not None:
            retention.cancel()
        await services.close()
        log.info("stopped")


def _tls_reloader(settings: Settings) -> tls.CertificateReloader | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return tls.CertificateReloader.load(
        settings.tls_cert,
        settings.tls_key,
        settings.tls_client_ca,
        settings.tls_client_crl,
    )


def _wrap_for_tls(app: Any, reloader: tls.CertificateReloader | None) -> Any:
    return tls.StrictTransportSecurity(app) if reloader is not None else app


def _start_tls_watch(
    reloader: tls.CertificateReloader | None, interval: float
) -> asyncio.Task[None] | None:
    """Reload the certificate on SIGHUP and when its files change.

    Without TLS, SIGHUP is logged and ignored, as with several workers, so that
    a signal meant for a reload does not stop the server.
    """
    if reloader is None:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, log.info, "SIGHUP ignored: no TLS certificate to reload"
        )
        return None
    reloader.install_signal_handler()
    # A forked worker ignores SIGHUP until this point (see moorage.workers), so
    # a renewal since the files were read is loaded now, not at the first poll.
    reloader.reload_if_changed()
    return asyncio.create_task(reloader.watch(interval))


def _start_garbage_collection(services: Services) -> asyncio.Task[None] | None:
    """Collect garbage every gc_interval_hours, unless that is 0.

    Every worker and replica starts this; a run takes the lease in the
    database, so one process collects at a time and the others skip that
    round. The task is cancelled when the server stops, and waits first, so
    that a stop never begins a run.
    """
    hours = services.settings.gc_interval_hours
    if hours <= 0:
        return None
    from moorage.maintenance import run_periodically

    return asyncio.create_task(
        run_periodically(services, SERVER_ACTOR, timedelta(hours=hours), asyncio.sleep)
    )


# How often stale upload sessions, expired refresh tokens and old failed-login
# counters are looked for, and scheduled deletions of customers' repositories.
PURGE_INTERVAL_SECONDS = 600


async def _purge_periodically(services: Services) -> None:
    """Delete stale upload sessions, upload data left in trash, the records of
    expired refresh tokens and failed-login counters past the throttle's memory.

    Every worker process runs this; the deletes are idempotent.
    """
    expiry = timedelta(hours=services.settings.upload_expiry_hours)
    refresh_tokens = services.authenticator.refresh_tokens
    throttle = services.authenticator.throttle
    while True:
        try:
            purged = await services.registry.purge_stale_uploads(utcnow() - expiry)
        except Exception:
            log.exception("purging stale uploads failed")
        else:
            if purged:
                log.info("purged stale uploads", count=purged)
        try:
            deleted = await services.registry.empty_trash()
        except Exception:
            log.exception("emptying the upload trash failed")
        else:
            if deleted:
                log.info("deleted upload data left in trash", count=deleted)
        try:
            purged = await refresh_tokens.purge_expired(utcnow())
        except Exception:
            log.exception("purging expired refresh tokens failed")
        else:
            if purged:
                log.info("purged expired refresh tokens", count=purged)
        try:
            purged = await _purge_login_failures(throttle)
        except Exception:
            log.exception("purging old failed-login counters failed")
        else:
            if purged:
                log.info("purged old failed-login counters", count=purged)
        try:
            await run_due_deletions(services, SERVER_ACTOR)
        except Exception:
            log.exception("scheduled deletion of repositories failed")
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)


async def _purge_login_failures(throttle: LoginThrottle) -> int:
    """Delete counters the throttle has forgotten and known addresses it no
    longer counts as known."""
    now = time.time()
    policy = throttle.policy
    return await throttle.store.purge(
        failures_before=now - policy.forget_after,
        known_before=now - policy.known_address_days * 86400,
    )


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
        # uvicorn re-raises the stop signal next, which ends the process
        # without running exit handlers.
        flush_logs()

    return lifespan
