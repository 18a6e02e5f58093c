"""Write transactions on a SQLite file, each run whole in one thread hop.

Through aiosqlite, every step of a transaction is a call into aiosqlite's
thread and a wake-up of the event loop: connect, each statement's cursor,
execute and close, commit, and the pool's reset. A small write transaction
takes a dozen of them. The registry's hot writes (an upload session starts, a
blob is linked, a manifest is stored) instead run as one synchronous function
on a pysqlite connection in a thread of this process, so the event loop waits
for one result per transaction. The statements are the same SQLAlchemy Core
statements that PostgreSQL runs (see `RegistryStore._transact`), and the
connection gets the same pragmas as the engine's (WAL, synchronous=NORMAL,
foreign keys, a busy timeout of 30 s).

One thread runs every transaction of the process in turn. SQLite lets only one
writer at a time into the file anyway, so this serialises nothing that was
parallel before.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import StaticPool

from moorage.db.engine import configure_sqlite

T = TypeVar("T")


class SQLiteWriter:
    """This process's write connection to a SQLite file and the thread it runs in."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._engine: Engine | None = None
        self._connection: Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0

    async def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one transaction: commit when it returns, roll back on raise.

        A caller that is cancelled while it waits does not stop the transaction,
        which commits or rolls back in its thread as if the caller still waited.
        """
        executor = self._start()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._transact, work)

    def _transact(self, work: Callable[[Connection], T]) -> T:
        # The thread keeps its connection open between transactions, which
        # saves a pool checkout and return (with its rollback) on each.
        assert self._engine is not None
        if self._connection is None or self._connection.invalidated:
            if self._connection is not None:
                self._connection.close()
            self._connection = self._engine.connect()
        try:
            with self._connection.begin():
                return work(self._connection)
        except BaseException:
            if self._connection.in_transaction():
                # The rollback itself failed: start over with a new connection.
                self._connection.close()
                self._connection = None
            raise

    def _start(self) -> ThreadPoolExecutor:
        # Neither the thread nor the connection survives a fork: each worker
        # process starts its own.
        if self._executor is None or self._pid != os.getpid():
            engine = create_engine(
                f"sqlite:///{self.path}",
                connect_args={"timeout": 30, "check_same_thread": False},
                poolclass=StaticPool,
                # As in moorage.db.engine: no bound values in error messages.
                hide_parameters=True,
            )
            event.listen(engine, "connect", configure_sqlite)
            self._engine = engine
            self._connection = None
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            self._pid = os.getpid()
        return self._executor

    def close(self) -> None:
        """Wait for the transaction in progress, then close the connection."""
        if self._executor is not None and self._pid == os.getpid():
            executor, self._executor = self._executor, None
            executor.submit(self._close_connection)
            executor.shutdown(wait=True)
            assert self._engine is not None
            self._engine.dispose()
        self._executor = None
        self._engine = None
        self._connection = None

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def sqlite_writer(engine: AsyncEngine) -> SQLiteWriter | None:
    """Return a writer for a SQLite file database, else None."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return SQLiteWriter(str(url.database))
