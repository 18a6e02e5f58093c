"""Queries for the audit trail: append with the hash chain, read, archive."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Select, and_, delete, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.audit.checkpoints import Checkpoint
from moorage.audit.events import (
    EVENT_FIELDS,
    AuditEvent,
    StoredEvent,
    chain,
    chain_with_times,
    event_values,
    fit_all,
)
from moorage.db.dialects import InNetwork, insert_ignore
from moorage.db.schema import (
    audit_archives,
    audit_checkpoints,
    audit_events,
    audit_head,
    utcnow,
)
from moorage.db.sqlite_writer import sqlite_writer
from moorage.db.transactions import begin, connect, in_unit_of_work, unit_of_work

_EVENT_COLUMNS = [audit_events.c[name] for name in EVENT_FIELDS]
# Times per query of `AuditStore.stored_already`, well below the parameter
# limits of SQLite (32,766 since 3.32) and asyncpg (32,767).
_LOOKUP_TIMES = 500
# The columns of a stored event in the order `_row_values` lists them.
_ROW_COLUMNS = (
    "action",
    "outcome",
    "actor_account",
    "actor_customer",
    "source_address",
    "user_agent",
    "repository",
    "reference",
    "digest",
    "bytes",
    "reason",
    "request_id",
    "link",
    "seq",
    "prev_hash",
    "hash",
    "time",
)
# The asyncpg insert of one row, in asyncpg's placeholders ($1, $2, ...).
_ASYNCPG_INSERT = (
    f"INSERT INTO audit_events ({', '.join(_ROW_COLUMNS)}) "  # noqa: S608 (constant names)
    f"VALUES ({', '.join(f'${n}' for n in range(1, len(_ROW_COLUMNS) + 1))})"
)
_SQLITE_ROW = f"({', '.join('?' for _ in _ROW_COLUMNS)})"
# Maximum rows per SQLite INSERT statement. Under callgrind (SQLite 3.40, raw
# sqlite3, 2,000 rows of request events) executemany took about 52,000
# instructions per row, and compiled statements of 100 rows 43,000 and of 500
# rows 42,000. Compiling a statement costs about 29,000 instructions per row in
# it, so a batch goes in statements of power-of-two sizes (see
# `_statement_sizes`), whose few texts stay in the driver's statement cache.
_SQLITE_ROWS_PER_INSERT = 128


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Conditions for listing events; None means any.

    `customer` matches the events of that customer's accounts and the events in
    its namespace by callers of no customer (see `_customer_condition`).
    """

    customer: str | None = None
    # With `customer`: also match events in its namespace by other customers'
    # accounts, such as their denied requests for its repositories.
    other_customers: bool = False
    account: str | None = None
    repository: str | None = None
    action: str | None = None
    outcome: str | None = None
    source_address: str | None = None
    # A network in CIDR form (10.0.0.0/8, 2001:db8::/32): matches the events
    # whose source address is inside it.
    source_network: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int | None = None


@dataclass(frozen=True, slots=True)
class ArchiveRecord:
    first_seq: int
    last_seq: int
    last_hash: str
    path: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    customer: str | None
    action: str
    events: int
    bytes: int


def _stored(row: Any) -> StoredEvent:
    values = dict(zip(EVENT_FIELDS, row[1:-2], strict=True))
    return StoredEvent(row[0], AuditEvent(**values), row[-2], row[-1])


def _event_select() -> Select[Any]:
    return select(
        audit_events.c.seq,
        *_EVENT_COLUMNS,
        audit_events.c.prev_hash,
        audit_events.c.hash,
    )


def append_events(
    connection: Connection, events: Sequence[AuditEvent]
) -> list[StoredEvent]:
    """Chain and insert events in the caller's transaction.

    It runs synchronously: on SQLite in the process's writer thread (see
    `AuditStore.append`), else through `run_sync`. The UPDATE of the head row
    comes first: it takes the write lock (SQLite) or the row lock (PostgreSQL)
    before the head is read, so concurrent writers in other processes append
    one after the other.
    """
    connection.execute(
        update(audit_head).where(audit_head.c.id == 1).values(seq=audit_head.c.seq)
    )
    head = connection.execute(
        select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
    ).one()
    fitted = fit_all(events)
    if connection.dialect.name == "sqlite":
        stored = _insert_sqlite(connection, fitted, head.seq, head.hash)
    elif connection.dialect.driver == "asyncpg":
        stored = chain(fitted, head.seq, head.hash)
        _insert_asyncpg(connection, stored)
    else:
        stored = chain(fitted, head.seq, head.hash)
        connection.execute(audit_events.insert(), [_row(item) for item in stored])
    last = stored[-1]
    connection.execute(
        update(audit_head)
        .where(audit_head.c.id == 1)
        .values(seq=last.seq, hash=last.hash)
    )
    return stored


def _insert_sqlite(
    connection: Connection, events: list[AuditEvent], seq: int, prev_hash: str
) -> list[StoredEvent]:
    """Chain events and insert them with multi-row INSERT statements.

    Every pull and push adds a row, so on SQLite the statements go to the
    driver directly, with the values of up to `_SQLITE_ROWS_PER_INSERT` rows
    each, which costs less per row than executemany (see there). The time is
    bound as the text that a Core insert stores, cut from the text the hash
    covers.
    """
    stored, times = chain_with_times(events, seq, prev_hash)
    values: list[Any] = []
    # `_row_values` and `_sqlite_time` inlined: two calls cost about as much
    # as the tuple, and this runs for every request's event.
    for item, text in zip(stored, times, strict=True):
        event = item.event
        values += (
            event.action,
            event.outcome,
            event.actor_account,
            event.actor_customer,
            event.source_address,
            event.user_agent,
            event.repository,
            event.reference,
            event.digest,
            event.bytes,
            event.reason,
            event.request_id,
            event.link,
            item.seq,
            item.prev_hash,
            item.hash,
            text[:10] + " " + text[11:-1]
            if event.time.year >= 1000
            else sqlite_time(event.time),
        )
    width = len(_ROW_COLUMNS)
    start = 0
    for count in _statement_sizes(len(stored), _rows_per_insert()):
        connection.exec_driver_sql(
            _sqlite_insert(count),
            tuple(values[start * width : (start + count) * width]),
        )
        start += count
    return stored


def _statement_sizes(rows: int, largest: int) -> list[int]:
    """Split `rows` into statements of `largest` rows and powers of two below."""
    sizes = []
    while rows:
        size = largest if rows >= largest else 1 << (rows.bit_length() - 1)
        sizes.append(size)
        rows -= size
    return sizes


@functools.cache
def _sqlite_insert(rows: int) -> str:
    """Return the INSERT statement for `rows` events (cached: the statement
    text is also the key of the driver's prepared-statement cache)."""
    return (
        f"INSERT INTO audit_events ({', '.join(_ROW_COLUMNS)}) "  # noqa: S608 (constant names)
        f"VALUES {', '.join([_SQLITE_ROW] * rows)}"
    )


@functools.cache
def _rows_per_insert() -> int:
    """Return the rows per statement, fewer when this SQLite build allows fewer
    bound values than `_SQLITE_ROWS_PER_INSERT` rows take (the default limit
    was 999 before SQLite 3.32)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as probe:
        limit = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(_SQLITE_ROWS_PER_INSERT, limit // len(_ROW_COLUMNS)))


def _row_values(item: StoredEvent, time: Any) -> tuple[Any, ...]:
    """Return a stored event's values in `_ROW_COLUMNS` order, with `time` as
    the driver binds it. The values are read as plain attributes, because
    operator.attrgetter reads slots through the generic attribute look-up,
    several times slower."""
    event = item.event
    return (
        event.action,
        event.outcome,
        event.actor_account,
        event.actor_customer,
        event.source_address,
        event.user_agent,
        event.repository,
        event.reference,
        event.digest,
        event.bytes,
        event.reason,
        event.request_id,
        event.link,
        item.seq,
        item.prev_hash,
        item.hash,
        time,
    )


def _sqlite_time(text: str, event: AuditEvent) -> str:
    """Return `sqlite_time(event.time)` from `format_time(event.time)`."""
    if event.time.year < 1000:
        return sqlite_time(event.time)
    return text[:10] + " " + text[11:-1]


def _insert_asyncpg(connection: Connection, stored: list[StoredEvent]) -> None:
    """Insert events as plain tuples through asyncpg's executemany.

    A Core insert built each row's parameters through SQLAlchemy (a dict per
    row, bind processors, `construct_params`): about 5 us of an event's 17 us
    on PostgreSQL. The time is bound as `UTCDateTime` binds it: naive UTC
    (`fit` made it UTC).
    """
    rows = [_row_values(item, item.event.time.replace(tzinfo=None)) for item in stored]
    connection.exec_driver_sql(_ASYNCPG_INSERT, rows)


def sqlite_time(value: datetime) -> str:
    """Return a time as a Core insert stores it on SQLite: naive UTC,
    "YYYY-MM-DD HH:MM:SS.ffffff" (a unit test compares the two)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if value.microsecond and value.year >= 1000:
        # orjson formats a time in C, in about a third of isoformat's time,
        # as "YYYY-MM-DDTHH:MM:SS.ffffffZ" in quotes; it leaves out a
        # microsecond of 0 and writes early years differently.
        stamp = orjson.dumps(value, option=orjson.OPT_UTC_Z).decode()
        return stamp[1:11] + " " + stamp[12:-2]
    # isoformat pads the year to four digits, as SQLAlchemy's format does.
    return value.isoformat(" ", "microseconds")[:-6]  # without "+00:00"


def _row(stored: StoredEvent) -> dict[str, Any]:
    values = {name: getattr(stored.event, name) for name in EVENT_FIELDS}
    return {
        "seq": stored.seq,
        **values,
        "prev_hash": stored.prev_hash,
        "hash": stored.hash,
    }


def _conditions(query: Select[Any], where: AuditFilter) -> Select[Any]:
    columns = audit_events.c
    if where.customer is not None:
        query = query.where(_customer_condition(where.customer, where.other_customers))
    equal = {
        columns.actor_account: where.account,
        columns.repository: where.repository,
        columns.outcome: where.outcome,
        columns.source_address: where.source_address,
    }
    for column, value in equal.items():
        if value is not None:
            query = query.where(column == value)
    if where.source_network is not None:
        query = query.where(InNetwork(columns.source_address, where.source_network))
    if where.action is not None:
        if where.action.endswith("*"):
            query = query.where(columns.action.startswith(where.action[:-1]))
        else:
            query = query.where(columns.action == where.action)
    if where.since is not None:
        query = query.where(columns.time >= where.since)
    if where.until is not None:
        query = query.where(columns.time < where.until)
    if where.after_seq is not None:
        query = query.where(columns.seq > where.after_seq)
    return query


def _customer_condition(customer: str, other_customers: bool) -> Any:
    """Match the events of a customer: those of its accounts, and those in its
    namespace by callers of no customer. The latter are administrative changes
    to the customer (stored with the repository `<customer>/`), requests by
    vendor accounts and anonymous requests.

    Events in the namespace by other customers' accounts, such as their denied
    probes of its repositories, name those customers, their logins and
    addresses, so they match only with `other_customers`.
    """
    columns = audit_events.c
    in_namespace = columns.repository.startswith(customer + "/", autoescape=True)
    if not other_customers:
        in_namespace = and_(in_namespace, columns.actor_customer.is_(None))
    return or_(columns.actor_customer == customer, in_namespace)


class ArchiveConflictError(Exception):
    """Another process archived or removed events of this range first."""


class AuditStore:
    """Reads and writes the audit tables.

    Every method is one transaction, or joins the open unit of work (see
    `moorage.db.transactions`).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.writer = sqlite_writer(engine)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def unit_of_work(self) -> AbstractAsyncContextManager[None]:
        """Open one transaction that every store call in this task joins until exit.

        Store calls made while it is open, on this store or any other on the same
        database, commit together when the block ends (see
        `moorage.db.transactions.unit_of_work`).
        """
        return unit_of_work(self.engine)

    async def append(self, events: Sequence[AuditEvent]) -> list[StoredEvent]:
        """Chain and insert events, inside the open unit of work when there is one."""
        if not events:
            return []
        if self.writer is not None and not in_unit_of_work(self.engine):
            # The whole append (head, chain hashes, insert) runs in the writer
            # thread: the SQLite write lock is held for one thread's work, not
            # across event-loop turns, and the loop waits for one result.
            return await self.writer.run(
                lambda connection: append_events(connection, events)
            )
        async with begin(self.engine) as connection:
            return await connection.run_sync(append_events, events)

    async def has_event(self, action: str, reference: str) -> bool:
        """Return whether an event with this action and reference is stored."""
        query = (
            select(audit_events.c.seq)
            .where(audit_events.c.action == action)
            .where(audit_events.c.reference == reference)
            .limit(1)
        )
        async with connect(self.engine) as connection:
            return (await connection.execute(query)).first() is not None

    async def lock_head(self) -> None:
        """Lock the chain head until the open unit of work ends.

        It takes the write lock on SQLite and the head row's lock on PostgreSQL,
        as `append_events` does first. Appends in other transactions wait until
        the unit ends, and reads after the lock see every append committed before
        it (PostgreSQL's default READ COMMITTED takes a snapshot per statement).
        Raises RuntimeError outside a unit of work, where the lock would end at
        once.
        """
        if not in_unit_of_work(self.engine):
            raise RuntimeError("lock_head needs an open unit of work")
        async with begin(self.engine) as connection:
            await connection.execute(
                update(audit_head)
                .where(audit_head.c.id == 1)
                .values(seq=audit_head.c.seq)
            )

    async def stored_already(self, events: Sequence[AuditEvent]) -> list[bool]:
        """Return for each event whether an equal event is stored: one with the
        same time and the same value in every other field.

        Pass events as `fit` returns them, because that is how they are stored.
        It reads by the indexed time column, `_LOOKUP_TIMES` times per query.
        """
        found: set[tuple[Any, ...]] = set()
        times = sorted({event.time for event in events})
        async with connect(self.engine) as connection:
            for start in range(0, len(times), _LOOKUP_TIMES):
                query = select(*_EVENT_COLUMNS).where(
                    audit_events.c.time.in_(times[start : start + _LOOKUP_TIMES])
                )
                found.update(tuple(row) for row in await connection.execute(query))
        return [event_values(event) in found for event in events]

    async def head(self) -> tuple[int, str]:
        async with connect(self.engine) as connection:
            row = (
                await connection.execute(
                    select(audit_head.c.seq, audit_head.c.hash).where(
                        audit_head.c.id == 1
                    )
                )
            ).one()
        return int(row.seq), str(row.hash)

    async def anchor(self) -> tuple[int, str] | None:
        """Return the last archived event (seq, hash), where the table now starts."""
        async with connect(self.engine) as connection:
            row = (
                await connection.execute(
                    select(audit_archives.c.last_seq, audit_archives.c.last_hash)
                    .order_by(audit_archives.c.last_seq.desc())
                    .limit(1)
                )
            ).first()
        return None if row is None else (int(row[0]), str(row[1]))

    async def list_events(
        self, where: AuditFilter, limit: int, *, newest_first: bool = False
    ) -> list[StoredEvent]:
        """Return up to `limit` matching events, by sequence number: the oldest
        ones first, or with `newest_first` the newest ones first."""
        order = audit_events.c.seq.desc() if newest_first else audit_events.c.seq
        query = _conditions(_event_select(), where).order_by(order).limit(limit)
        async with connect(self.engine) as connection:
            return [_stored(row) for row in await connection.execute(query)]

    async def iterate(
        self, where: AuditFilter | None = None, page: int = 1000
    ) -> AsyncIterator[StoredEvent]:
        """Yield events in sequence order, one page per query."""
        where = where or AuditFilter()
        after = where.after_seq
        while True:
            found = await self.list_events(
                AuditFilter(**{**_filter_dict(where), "after_seq": after}), page
            )
            for stored in found:
                yield stored
            if len(found) < page:
                return
            after = found[-1].seq

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint unless one for its seq exists.

        Two processes may sign the same newest event at once (a command exiting
        while the server writes); the second insert then does nothing.
        """
        async with begin(self.engine) as connection:
            await insert_ignore(
                connection,
                audit_checkpoints,
                {
                    "seq": checkpoint.seq,
                    "hash": checkpoint.hash,
                    "time": checkpoint.time,
                    "kid": checkpoint.kid,
                    "signature": checkpoint.signature,
                },
            )

    async def checkpoints(
        self, first_seq: int | None = None, last_seq: int | None = None
    ) -> list[Checkpoint]:
        query = select(audit_checkpoints).order_by(audit_checkpoints.c.seq)
        if first_seq is not None:
            query = query.where(audit_checkpoints.c.seq >= first_seq)
        if last_seq is not None:
            query = query.where(audit_checkpoints.c.seq <= last_seq)
        async with connect(self.engine) as connection:
            return [Checkpoint(*row) for row in await connection.execute(query)]

    async def last_checkpoint_seq(self) -> int:
        async with connect(self.engine) as connection:
            found = await connection.scalar(select(func.max(audit_checkpoints.c.seq)))
        return int(found or 0)

    async def oldest_before(self, before: datetime) -> int | None:
        """Return the newest seq of the leading run of events older than `before`."""
        async with connect(self.engine) as connection:
            first_newer = await connection.scalar(
                select(func.min(audit_events.c.seq)).where(
                    audit_events.c.time >= before
                )
            )
            query = select(func.max(audit_events.c.seq)).where(
                audit_events.c.time < before
            )
            if first_newer is not None:
                query = query.where(audit_events.c.seq < first_newer)
            found = await connection.scalar(query)
        return None if found is None else int(found)

    async def remove_archived(
        self, first_seq: int, last_seq: int, last_hash: str, path: str
    ) -> int:
        """Delete events up to `last_seq`, recording where the chain resumes.

        Raises ArchiveConflictError before it changes anything unless the
        table still starts at `first_seq` and contains the whole range, because
        another server worker, replica or command may have archived it first.
        """
        async with begin(self.engine) as connection:
            # Lock the chain head as appends do, so two archive runs check and
            # delete one after the other.
            await connection.execute(
                update(audit_head)
                .where(audit_head.c.id == 1)
                .values(seq=audit_head.c.seq)
            )
            low, high, count = (
                await connection.execute(
                    select(
                        func.min(audit_events.c.seq),
                        func.max(audit_events.c.seq),
                        func.count(),
                    ).where(audit_events.c.seq <= last_seq)
                )
            ).one()
            archived = await connection.scalar(
                select(func.max(audit_archives.c.last_seq))
            )
            whole = low == first_seq and high == last_seq
            if (
                not whole
                or count != last_seq - first_seq + 1
                or (archived or 0) >= first_seq
            ):
                raise ArchiveConflictError(
                    f"events {first_seq}-{last_seq} were archived by another "
                    "process first"
                )
            await connection.execute(
                audit_archives.insert().values(
                    first_seq=first_seq,
                    last_seq=last_seq,
                    last_hash=last_hash,
                    path=path,
                    created_at=utcnow(),
                )
            )
            await connection.execute(
                delete(audit_checkpoints).where(audit_checkpoints.c.seq <= last_seq)
            )
            result = await connection.execute(
                delete(audit_events).where(audit_events.c.seq <= last_seq)
            )
        return int(result.rowcount)

    async def archives(self) -> list[ArchiveRecord]:
        query = select(
            audit_archives.c.first_seq,
            audit_archives.c.last_seq,
            audit_archives.c.last_hash,
            audit_archives.c.path,
            audit_archives.c.created_at,
        ).order_by(audit_archives.c.last_seq)
        async with connect(self.engine) as connection:
            return [ArchiveRecord(*row) for row in await connection.execute(query)]

    async def usage(
        self, actions: Sequence[str], since: datetime | None, until: datetime | None
    ) -> list[UsageRow]:
        """Count successful events and sum their bytes per day, customer, action."""
        day = func.date(audit_events.c.time)
        query = (
            select(
                day,
                audit_events.c.actor_customer,
                audit_events.c.action,
                func.count(),
                func.coalesce(func.sum(audit_events.c.bytes), 0),
            )
            .where(audit_events.c.action.in_(actions))
            .where(audit_events.c.outcome == "success")
            .group_by(day, audit_events.c.actor_customer, audit_events.c.action)
            .order_by(day, audit_events.c.actor_customer, audit_events.c.action)
        )
        query = _conditions(query, AuditFilter(since=since, until=until))
        async with connect(self.engine) as connection:
            return [
                UsageRow(str(row[0]), row[1], row[2], int(row[3]), int(row[4]))
                for row in await connection.execute(query)
            ]


def _filter_dict(where: AuditFilter) -> dict[str, Any]:
    return {name: getattr(where, name) for name in AuditFilter.__slots__}
