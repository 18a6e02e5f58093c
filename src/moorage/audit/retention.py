"""Retention: archive old audit events to files, once an hour in the server."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from moorage.audit.log import DatabaseAuditLog
from moorage.config import Settings
from moorage.db.audit_store import ArchiveConflictError
from moorage.db.schema import utcnow

log = structlog.get_logger(__name__)

RETENTION_CHECK_SECONDS = 3600


async def archive_expired(audit: DatabaseAuditLog, settings: Settings) -> None:
    """Archive the events older than the retention period, if one is set."""
    if settings.audit_retention_days is None:
        return
    cutoff = utcnow() - timedelta(days=settings.audit_retention_days)
    try:
        path = await audit.archive(cutoff, settings.resolved_audit_archive_dir)
    except ArchiveConflictError as error:
        # Every worker runs this job, so another one often got there first.
        log.info("audit archive skipped", reason=str(error))
        return
    if path is not None:
        log.info("audit events archived", path=str(path))


async def _retention_loop(audit: DatabaseAuditLog, settings: Settings) -> None:
    while True:
        try:
            await archive_expired(audit, settings)
        except Exception:
            log.exception("audit archive failed; retrying in an hour")
        await asyncio.sleep(RETENTION_CHECK_SECONDS)


def start_retention(
    audit: DatabaseAuditLog, settings: Settings
) -> asyncio.Task[None] | None:
    if settings.audit_retention_days is None:
        return None
    return asyncio.create_task(_retention_loop(audit, settings), name="audit-retention")
