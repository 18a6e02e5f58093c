"""Read the identity revision cheaply, and cache identity rows while it holds.

Database triggers increase `identity_revision.revision` in the same transaction
as every change to the tables in `IDENTITY_TABLES` (accounts, customers,
namespaces, grants, personal access tokens), whichever process or replica makes
it: the server, another worker, the command line. A process keeps rows it read
from those tables together with the revision it read first, and reuses them
only while a fresh read of the revision returns the same number. So a disabled
account, a suspended customer, a removed grant or a rotated secret is seen on
the next request, and unchanged identities cost one small read per request.

Two readers:

- SQLite in a file: this process's own `sqlite3` connection reads the row in
  the event loop thread (see moorage.db.direct), in microseconds.
- Anything else (PostgreSQL): one query through the engine, shared by the
  requests that arrive while it runs. A request joins only a query that starts
  after it arrived, so it never sees a revision older than its own start.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.direct import DirectReadError, DirectReads, direct_reads, prepare
from moorage.db.schema import identity_revision

K = TypeVar("K")
V = TypeVar("V")


class RevisionReader(Protocol):
    async def current(self) -> int:
        """Return the revision as committed when this call started, or later."""

    def close(self) -> None: ...


def revision_reader(engine: AsyncEngine) -> RevisionReader:
    """Return the cheapest reader that is correct for the engine's database."""
    direct = direct_reads(engine)
    if direct is not None:
        return DirectReader(engine, direct)
    return SharedQueryReader(engine)


_REVISION = select(identity_revision.c.revision).where(identity_revision.c.id == 1)
_DIRECT_REVISION = prepare(_REVISION)


async def query_revision(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(_REVISION)
    return int(value or 0)


class DirectReader:
    """Reads the revision of a SQLite file with this process's own connection
    (see moorage.db.direct), or through the engine when that read fails."""

    def __init__(self, engine: AsyncEngine, direct: DirectReads) -> None:
        self.engine = engine
        self.direct = direct

    async def current(self) -> int:
        try:
            row = self.direct.first(_DIRECT_REVISION)
        except DirectReadError:
            return await query_revision(self.engine)
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.direct.close()


class SharedQueryReader:
    """Queries the revision; concurrent callers share the next query to start."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._next: asyncio.Future[int] | None = None
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> int:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # Mark the error as seen, in case every waiter was cancelled.
            self._next.add_done_callback(_consume_error)
        waiting = self._next
        if not self._running:
            self._running = True
            self._task = asyncio.create_task(self._run())
        return await asyncio.shield(waiting)

    async def _run(self) -> None:
        try:
            while self._next is not None:
                # Callers that arrive from now on wait for the next query.
                answered, self._next = self._next, None
                try:
                    answered.set_result(await query_revision(self.engine))
                except Exception as error:  # noqa: BLE001 (passed to every waiter)
                    answered.set_exception(error)
        finally:
            self._running = False

    def close(self) -> None:
        return None


def _consume_error(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()


class RevisionCache(Generic[K, V]):
    """Values read at one identity revision, dropped when the revision moves on.

    `put` takes the revision read before the value was loaded, so a value loaded
    while a change committed is never stored under the newer revision.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.revision: int | None = None
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, revision: int) -> V | None:
        if revision != self.revision:
            self._entries.clear()
            self.revision = revision
            return None
        return self._entries.get(key)

    def peek(self, key: K) -> V | None:
        """Return the value kept at the revision read last, without reading the
        revision: it may be one change behind until the next `get`."""
        return self._entries.get(key)

    def put(self, key: K, value: V, revision: int) -> None:
        if revision != self.revision:
            return
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
