"""Connections for the stores, and the unit of work that joins their transactions.

Each store method runs in a transaction of its own unless it is called inside
`unit_of_work(engine)`. There it joins the transaction the unit opened, so an
administrative change and its audit event commit together or not at all.

The open unit lives in a context variable. A task created inside a unit copies
that context, so only the task that opened the unit may use it, and store calls
from any other task raise RuntimeError while it is open. One connection can run
only one statement at a time, and a second connection would wait for the
unit's write lock on SQLite until the busy timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@dataclass
class _Unit:
    engine: Engine
    connection: AsyncConnection | None
    owner: asyncio.Task[object] | None


_current_unit: ContextVar[_Unit | None] = ContextVar(
    "moorage_unit_of_work", default=None
)


class _Joined:
    """A context manager that yields the unit's connection and leaves commit and
    rollback to the unit."""

    __slots__ = ("connection",)

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def __aenter__(self) -> AsyncConnection:
        return self.connection

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


def _open_unit(engine: AsyncEngine) -> AsyncConnection | None:
    """Return the connection of the unit open on `engine` in this task, if any."""
    unit = _current_unit.get()
    if unit is None or unit.connection is None or unit.engine is not engine.sync_engine:
        return None
    if asyncio.current_task() is not unit.owner:
        raise RuntimeError(
            "a task created inside a unit of work used the database while the "
            "unit was open; make the store call from the task that opened it"
        )
    return unit.connection


def in_unit_of_work(engine: AsyncEngine) -> bool:
    """Return whether this task has a unit of work open on `engine`."""
    return _open_unit(engine) is not None


def begin(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncConnection]:
    """Join the open unit of work on `engine`, or begin a transaction of its own."""
    connection = _open_unit(engine)
    return engine.begin() if connection is None else _Joined(connection)


def connect(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncConnection]:
    """Read in the open unit of work on `engine` (seeing its changes), or connect."""
    connection = _open_unit(engine)
    return engine.connect() if connection is None else _Joined(connection)


@asynccontextmanager
async def unit_of_work(engine: AsyncEngine) -> AsyncIterator[None]:
    """Open one transaction that every store call in this task joins until exit.

    It commits when the block ends and rolls back when the block raises. Units
    do not nest: opening one inside another on the same engine raises
    RuntimeError, because the inner one could neither commit nor roll back alone.
    """
    if _open_unit(engine) is not None:
        raise RuntimeError("a unit of work is already open on this database")
    async with engine.begin() as connection:
        unit = _Unit(engine.sync_engine, connection, asyncio.current_task())
        token = _current_unit.set(unit)
        try:
            yield
        finally:
            unit.connection = None
            _current_unit.reset(token)
