"""Serve with several worker processes that share one listening socket.

The parent migrates the database and creates the first admin once, opens the
socket, forks the workers and waits. SIGTERM or SIGINT to the parent is passed
on to every worker, which finishes its requests and stops. Each worker opens
its own database connections and blob store; caches are per process, and
upload sessions already work across processes (see `moorage.storage.registry`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from types import FrameType

import structlog
from rich.console import Console

from moorage import admin
from moorage.config import Settings
from moorage.server import _announce_admin, run_on_uvloop, run_server
from moorage.services import open_services

log = structlog.get_logger(__name__)


def run_workers(settings: Settings, console: Console) -> None:
    run_on_uvloop(_prepare(settings, console))
    listener = socket.create_server((settings.host, settings.port), backlog=2048)
    workers = [_fork(settings, console, listener) for _ in range(settings.workers)]
    listener.close()
    log.info("workers started", pids=workers)
    _supervise(workers)


async def _prepare(settings: Settings, console: Console) -> None:
    """Migrate and create the first admin before any worker starts."""
    services = await open_services(settings)
    try:
        password = (
            settings.admin_password.get_secret_value()
            if settings.admin_password
            else None
        )
        created = await admin.ensure_vendor_admin(
            services.identity, settings.admin_username, password
        )
        if created is not None:
            _announce_admin(console, created)
    finally:
        await services.close()


def _fork(settings: Settings, console: Console, listener: socket.socket) -> int:
    pid = os.fork()
    if pid != 0:
        return pid
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        run_on_uvloop(run_server(settings, console, [listener]))
    except BaseException:
        log.exception("worker failed")
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _supervise(workers: list[int]) -> None:
    """Wait for the workers; stop them all when asked to or when one exits."""
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    remaining = set(workers)
    status = 0
    while remaining:
        pid, code = os.wait()
        remaining.discard(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        # uvicorn ends with the signal it was stopped by, after a clean shutdown.
        if not (stopping and exit_code in (0, -signal.SIGTERM, -signal.SIGINT)):
            status = status or exit_code
            log.error("worker exited", pid=pid, status=exit_code)
        # NOTE: a worker that exits is not restarted; the others are stopped
        # so that a supervisor (systemd, Kubernetes) sees the failure.
        stopping = True
        for other in remaining:
            _signal(other, signal.SIGTERM)
    log.info("stopped")
    if status:
        raise SystemExit(1)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
