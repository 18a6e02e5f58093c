"""Database engines and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import event, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from moorage.db.dialects import sqlite_in_network

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


# The sqlite3 module binds None as NULL only after it looked for an adapter,
# then for `__adapt__` on its protocol type, which raises and clears an
# AttributeError for each None bound (CPython 3.11, Modules/_sqlite). An
# adapter for None skips that: under callgrind it cut about 8,000 of the
# audit writer's instructions per event, which binds six or so None values.
# The adapter is process-wide and returns None, which still binds as NULL.
# It is the `get` method of an empty dict, which returns None for the key
# None. That call into C costs about 240 instructions less per value than a
# Python function that returns its argument (callgrind, CPython 3.11, raw
# sqlite3 inserts of six NULLs).
_NO_ENTRIES: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NO_ENTRIES.get)


SQLITE_BUSY_TIMEOUT_MS = 30000


def configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI and the server use the database at the same time;
    # NORMAL synchronous is durable across process crashes in WAL mode.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Zero the bytes of deleted rows and freed pages instead of leaving them in
    # the file, so a shredded key leaves no copy behind (see moorage.db.wipe).
    # Builds of SQLite differ in the default: Debian's has it on.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()
    dbapi_connection.create_function(
        "moorage_in_network", 2, sqlite_in_network, deterministic=True
    )


# alembic is imported where it is used: it brings mako and pygments (about
# 10 MiB), which worker processes that never migrate do not need.


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> tuple[list[str], list[str]]:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    if connection.dialect.name == "postgresql":
        # Replicas that start together migrate one after the other.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
        )
    before = MigrationContext.configure(connection).get_current_heads()
    command.upgrade(_alembic_config(connection), "head")
    after = MigrationContext.configure(connection).get_current_heads()
    # The check reads every table, so it runs only when a migration did.
    if connection.dialect.name == "sqlite" and set(before) != set(after):
        _check_foreign_keys(connection)
    return list(before), list(after)


def _upgrade_sqlite(connection: Connection) -> tuple[list[str], list[str]]:
    """Run `_upgrade` in one SQLite transaction that includes the DDL.

    Python's sqlite3 module begins a transaction only before INSERT, UPDATE,
    DELETE or REPLACE, so each CREATE TABLE before the first of those commits
    on its own. A migration killed half-way then left tables without a
    revision in alembic_version, and every later start failed on "table ...
    already exists". With the module's own transaction handling off (isolation_level
    None), an explicit BEGIN covers every statement, as SQLAlchemy's SQLite
    documentation recommends for transactional DDL. A process that dies before
    the commit leaves the database as it was.

    NOTE: BEGIN is deferred, so two processes that migrate the same new file
    at once still collide: the second fails on "database is locked" when it
    first writes, and the file keeps the first one's schema.
    """
    driver = connection.connection.dbapi_connection
    assert driver is not None
    previous = driver.isolation_level
    # Setting None commits what the module began; nothing is open here.
    driver.isolation_level = None
    try:
        with connection.begin():
            connection.exec_driver_sql("BEGIN")
            heads = _upgrade(connection)
    except BaseException:
        # Ctrl-C cancels the start, which can close the connection before this
        # runs; the error that stopped the migration is the one to report.
        with contextlib.suppress(Exception):
            driver.isolation_level = previous
        raise
    # The connection goes back to the pool for the server's own use.
    driver.isolation_level = previous
    return heads


def _check_foreign_keys(connection: Connection) -> None:
    """Raise when a migration left a row whose foreign key matches no row.

    SQLite migrations run with enforcement off (see `migrate`), so this check
    replaces it before the commit.
    """
    violations = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if violations:
        table, rowid, parent, _ = violations[0]
        raise RuntimeError(
            f"the migration left {len(violations)} rows whose foreign key matches "
            f"no row, such as row {rowid} of {table} (no match in {parent}); "
            "nothing was changed"
        )


async def migrate(engine: AsyncEngine) -> list[str]:
    """Bring the schema to the newest revision; return the new heads if it changed.

    The history has one head: a feature that adds a migration revises the
    newest revision, or adds a merge revision, as Alembic's `upgrade head`
    requires. A database stamped at several heads (before merge revision 0006)
    is upgraded through the merge.

    On SQLite, foreign key enforcement is off while the migrations run, because
    rebuilding a table in batch mode drops the table that other rows reference.
    `PRAGMA foreign_key_check` runs before the commit instead. The pragma is
    ignored inside a transaction, so it is set before the first write begins one.
    """
    sqlite = engine.dialect.name == "sqlite"
    async with engine.connect() as connection:
        try:
            if sqlite:
                await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                await connection.commit()
            if sqlite:
                before, after = await connection.run_sync(_upgrade_sqlite)
            else:
                async with connection.begin():
                    before, after = await connection.run_sync(_upgrade)
        finally:
            if sqlite:
                await connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                await connection.commit()
    if set(before) == set(after):
        return []
    log.info(
        "database migrated",
        revision=",".join(after),
        previous=",".join(before) or "none",
    )
    return after


def head_revisions() -> set[str]:
    """Return the head revisions of the migration history: one, unless a new
    branch was added without a merge revision."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return set(ScriptDirectory.from_config(config).get_heads())


# Exceptions that asyncpg raises when it cannot reach the database server: a
# refused or timed-out connection, or a host name that does not resolve.
UNREACHABLE_DATABASE_ERRORS = (ConnectionError, TimeoutError, socket.gaierror)


def unreachable_database_message(url: str, error: BaseException) -> str:
    """Return the message for a failed connection to the database at `url`,
    without its password, with what to check next."""
    address = make_url(url)
    host = address.host or "localhost"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    # asyncpg also takes the port from the query (?port=5433); the URL's wins.
    port = address.port or address.query.get("port") or "default port"
    return (
        f"cannot connect to the database at {host}:{port}: "
        f"{error}; check database_url and that the database server runs"
    )
