"""Small reads of a SQLite file in the event loop thread, without aiosqlite.

aiosqlite runs every call (cursor, execute, fetch, close) in its own thread and
wakes the event loop for each result; a point query costs several hundred
microseconds of CPU that way. The few reads on the path of every request (the
identity revision, a manifest by tag, a blob's visibility, the failed-login
counters of a login) go through a plain
`sqlite3` connection of this process instead, which answers in tens of
microseconds. In WAL mode a read never waits for a writer, and the connection
is in autocommit mode, so each read sees the newest commit and holds no read
transaction open. With a busy timeout of 0 a read that would wait (during WAL
recovery, for example) fails at once, and the caller falls back to the engine.

Statements are SQLAlchemy Core selects with named `bindparam`s, compiled once
for SQLite, so each query is written once for both paths.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import CompoundSelect, Select

log = structlog.get_logger(__name__)

_DIALECT = sqlite.dialect()
# A failing direct read is logged at most this often, with the failures since.
WARNING_INTERVAL_SECONDS = 60


class DirectReadError(Exception):
    """A direct read failed; the caller should query through the engine."""


@dataclass(frozen=True, slots=True)
class PreparedRead:
    sql: str
    parameters: tuple[str, ...]
    # Values of the literals in the statement, which SQLAlchemy binds as well.
    literals: dict[str, Any]


def prepare(statement: Select[Any] | CompoundSelect[Any]) -> PreparedRead:
    """Compile a select with named bindparams into SQLite's positional form."""
    compiled = statement.compile(dialect=_DIALECT)
    literals = {k: v for k, v in compiled.params.items() if v is not None}
    return PreparedRead(compiled.string, tuple(compiled.positiontup or ()), literals)


class DirectReads:
    """This process's own read connection to a SQLite database file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._failures = 0
        self._warned_at = -float(WARNING_INTERVAL_SECONDS)

    def first(self, read: PreparedRead, **values: Any) -> tuple[Any, ...] | None:
        """Return the first row of a prepared read; raise DirectReadError."""
        rows = self._execute(read, values, many=False)
        return rows[0] if rows else None

    def all(self, read: PreparedRead, **values: Any) -> list[tuple[Any, ...]]:
        """Return every row of a prepared read; raise DirectReadError."""
        return self._execute(read, values, many=True)

    def _execute(
        self, read: PreparedRead, values: dict[str, Any], *, many: bool
    ) -> list[tuple[Any, ...]]:
        values = {**read.literals, **values}
        arguments = tuple(values[name] for name in read.parameters)
        try:
            cursor = self._connect().execute(read.sql, arguments)
            rows = cursor.fetchall() if many else cursor.fetchmany(1)
        except sqlite3.Error as error:
            self._warn(error)
            self.close()
            raise DirectReadError(str(error)) from None
        return [tuple(row) for row in rows]

    def _warn(self, error: sqlite3.Error) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_SECONDS:
            log.warning(
                "direct read failed; using the engine",
                error=str(error),
                database=self.path,
                failures=self._failures,
            )
            self._warned_at = now
            self._failures = 0

    def _connect(self) -> sqlite3.Connection:
        # A connection must not cross a fork: each worker process opens its own.
        if self._connection is None or self._pid != os.getpid():
            self._connection = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            self._pid = os.getpid()
        return self._connection

    def close(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            self._connection.close()
        self._connection = None


def direct_reads(engine: AsyncEngine) -> DirectReads | None:
    """Return direct reads for a SQLite file database, else None."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return DirectReads(str(url.database))
