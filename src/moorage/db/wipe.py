"""Removal of deleted key material from the database's files.

A committed DELETE or UPDATE does not remove the old bytes from the files.
SQLite, with `PRAGMA secure_delete=ON` (set on every connection by
`configure_sqlite`), zeroes them in the new version of the page. That version
sits in the -wal file, and the main file keeps the old page until a
checkpoint copies the new one over it. The -wal file keeps older versions of
the page until it is reset. PostgreSQL keeps a deleted row in the table's
heap file until VACUUM frees its space, which VACUUM does without zeroing it.
The row also stays in the write-ahead log in pg_wal.

`wipe_deleted_keys` runs after `customer shred` commits, `checkpoint_wal`
after manifests are sealed (see docs/encryption.md, "What shredding
protects").
"""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.engine import SQLITE_BUSY_TIMEOUT_MS

log = structlog.get_logger(__name__)

# Checkpoint attempts while readers keep an older snapshot, and the busy
# timeout of each. A checkpoint that waits blocks writers, so it waits less
# than the 30 s that `configure_sqlite` gives other statements.
_CHECKPOINT_ATTEMPTS = 3
_CHECKPOINT_BUSY_TIMEOUT_MS = 5000
_CHECKPOINT_PAUSE_SECONDS = 1.0
# How long VACUUM FULL waits for its exclusive lock on `sealed_keys`. Servers
# read that table while they wait behind it, so the wait is kept short.
_VACUUM_LOCK_TIMEOUT = "5s"


async def wipe_deleted_keys(engine: AsyncEngine) -> bool:
    """Rewrite the database files so that deleted owner keys leave no copy there.

    SQLite: checkpoint the WAL into the main file and truncate it. PostgreSQL:
    `VACUUM FULL sealed_keys`, which writes the table to new files and frees
    the old ones, and a plain VACUUM of `data_key_wraps`, which is too large
    to lock. Returns False, after logging a warning, when that could not be
    done. The deletes stay committed either way.
    """
    if engine.dialect.name == "sqlite":
        return await checkpoint_wal(engine)
    return await _vacuum_key_tables(engine)


async def checkpoint_wal(engine: AsyncEngine) -> bool:
    """Copy every page in SQLite's WAL into the main file, then empty the WAL.

    `PRAGMA wal_checkpoint(TRUNCATE)` needs every reader to be on the newest
    snapshot and blocks writers while it waits for that, up to its busy
    timeout. It is tried `_CHECKPOINT_ATTEMPTS` times. Returns True on other
    databases.
    """
    if engine.dialect.name != "sqlite":
        return True
    for attempt in range(1, _CHECKPOINT_ATTEMPTS + 1):
        async with engine.connect() as connection:
            await connection.exec_driver_sql(
                f"PRAGMA busy_timeout={_CHECKPOINT_BUSY_TIMEOUT_MS}"
            )
            try:
                result = await connection.exec_driver_sql(
                    "PRAGMA wal_checkpoint(TRUNCATE)"
                )
                row: tuple[int, int, int] = tuple(result.one())
            finally:
                await connection.exec_driver_sql(
                    f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}"
                )
        busy, wal_pages, checkpointed = row
        if busy == 0:
            return True
        log.info(
            "WAL checkpoint blocked by readers, retrying",
            attempt=attempt,
            wal_pages=wal_pages,
            checkpointed=checkpointed,
        )
        await asyncio.sleep(_CHECKPOINT_PAUSE_SECONDS)
    log.warning(
        "WAL checkpoint failed because readers kept an older snapshot, so deleted "
        "rows stay in the -wal file until the next complete checkpoint",
        attempts=_CHECKPOINT_ATTEMPTS,
    )
    return False


async def _vacuum_key_tables(engine: AsyncEngine) -> bool:
    # NOTE: the WAL records of the deleted rows stay in pg_wal until PostgreSQL
    # recycles the segments, and in any WAL archive; nothing here removes them.
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        filenode = text("SELECT pg_relation_filenode('sealed_keys')")
        before = await autocommit.scalar(filenode)
        try:
            await autocommit.exec_driver_sql(
                f"SET lock_timeout = '{_VACUUM_LOCK_TIMEOUT}'"
            )
            await autocommit.exec_driver_sql("VACUUM FULL sealed_keys")
            await autocommit.exec_driver_sql("VACUUM data_key_wraps")
        except DBAPIError as error:
            log.warning("VACUUM of the key tables failed", error=str(error.orig))
            return False
        finally:
            await autocommit.exec_driver_sql("RESET lock_timeout")
        after = await autocommit.scalar(filenode)
    if before == after:
        # VACUUM skips, with only a warning, a table that the role does not own.
        log.warning(
            "VACUUM FULL did not rewrite sealed_keys, which only the table's "
            "owner or a superuser can do"
        )
        return False
    return True
