"""Database engines and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import event, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from alembic.config import Config

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number works; it only has to be the same for every replica.
_MIGRATION_LOCK_ID = 0x6D6F6F72


def create_engine(url: str) -> AsyncEngine:
    """Create an async engine with the settings each dialect needs.

    hide_parameters keeps bound values (password hashes, token hashes, names)
    out of the text of database errors, which the server logs.
    NOTE: asyncpg's own message for a value it cannot encode ("invalid input
    for query argument $1: <value> ...") still contains that value.
    """
    if url.startswith("sqlite"):
        _restrict_sqlite_file(url)
        engine = create_async_engine(
            url, connect_args={"timeout": 30}, hide_parameters=True
        )
        event.listen(engine.sync_engine, "connect", configure_sqlite)
        return engine
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_pre_ping=True, hide_parameters=True
    )


def _restrict_sqlite_file(url: str) -> None:
    """Make the database file readable by its owner only, creating it if needed.

    It contains password hashes and the audit trail. SQLite gives the -wal
    and -shm files the database file's permissions.
    """
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    if not path.parent.is_dir():
        return  # the connection will report the missing directory
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = os.fstat(descriptor).st_mode
        if mode & 0o077:
            os.fchmod(descriptor, stat.S_IMODE(mode) & 0o700)
            log.warning(
                "database file was readable by other users; now owner only",
                path=str(path),
            )
    finally:
        os.close(descriptor)


def configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI and the server use the database at the same time;
    # NORMAL synchronous is durable across process crashes in WAL mode.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


# alembic is imported where it is used: it brings mako and pygments (about
# 10 MiB), which worker processes that never migrate do not need.


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> list[str]:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    if connection.dialect.name == "postgresql":
        # Replicas that start together migrate one after the other.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
        )
    before = MigrationContext.configure(connection).get_current_heads()
    command.upgrade(_alembic_config(connection), "heads")
    after = MigrationContext.configure(connection).get_current_heads()
    return [] if set(before) == set(after) else list(after)


async def migrate(engine: AsyncEngine) -> list[str]:
    """Bring the schema to the newest revisions; return the new heads if it changed.

    Features may add migrations on branches of their own (each revising an
    older revision); every branch head is applied.
    """
    async with engine.begin() as connection:
        applied = await connection.run_sync(_upgrade)
    if applied:
        log.info("database migrated", revision=",".join(applied))
    return applied


def head_revisions() -> set[str]:
    """Return the newest revision of each migration branch."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return set(ScriptDirectory.from_config(config).get_heads())
