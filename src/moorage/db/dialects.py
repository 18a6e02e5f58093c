"""The few statements that SQLite and PostgreSQL spell differently."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Table, Text, cast, func
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.functions import FunctionElement

# SQLAlchemy's PostgreSQL dialect is imported only where a PostgreSQL statement
# is built, because it takes about 2 MiB per process (tracemalloc, SQLAlchemy
# 2.1) that a server on SQLite would never use. On PostgreSQL the engine has
# imported it already.


def insert_statement(dialect: Dialect, table: Table) -> Any:
    """Return the dialect's INSERT, which has `on_conflict_do_update` and
    `on_conflict_do_nothing` on both SQLite and PostgreSQL."""
    if dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_ignore_statement(
    dialect: Dialect, table: Table, values: dict[str, Any]
) -> Any:
    """Return an INSERT of a row that does nothing when the row's key exists."""
    statement = insert_statement(dialect, table).values(**values)
    return statement.on_conflict_do_nothing()


@functools.cache
def prepared_insert_ignore(dialect_name: str, table: Table) -> Any:
    """Return an INSERT into `table` that skips a row whose key exists.

    The statement has no values: pass each row to `execute` as parameters. It
    is built once per dialect and table, so SQLAlchemy finds its compiled
    form without building the statement and its cache key again.
    """
    if dialect_name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


@functools.cache
def prepared_upsert(
    dialect_name: str, table: Table, keys: Sequence[str], update: Sequence[str]
) -> Any:
    """Return an INSERT into `table` that updates the `update` columns of the
    row with the same `keys` instead, when there is one.

    Like `prepared_insert_ignore`, it has no values and is built once.
    """
    statement: Any
    if dialect_name == "postgresql":
        from sqlalchemy.dialects import postgresql

        statement = postgresql.insert(table)
    else:
        statement = sqlite.insert(table)
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={name: statement.excluded[name] for name in update},
    )


async def insert_ignore(
    connection: AsyncConnection, table: Table, values: dict[str, Any]
) -> None:
    """Insert a row unless one with the same key already exists."""
    await connection.execute(insert_ignore_statement(connection.dialect, table, values))


def lexical(column: ColumnClause[Any] | ColumnElement[Any], dialect: Dialect) -> Any:
    """Order by code point, as the distribution spec requires for tags and the catalog.

    PostgreSQL sorts by the database's locale unless told to use the C collation.
    """
    if dialect.name == "postgresql":
        return column.collate("C")
    return column


def json_array_agg(column: ColumnElement[Any], dialect: Dialect) -> Any:
    """Aggregate a column's values into the text of one JSON array.

    SQLite's `json_group_array` returns "[]" for no rows and PostgreSQL's
    `json_agg` returns NULL. Neither promises the order of the elements
    without an ORDER BY inside the call, which SQLite accepts from 3.44 on.
    PostgreSQL's result is cast to text, because asyncpg would decode a json
    value.
    """
    if dialect.name == "postgresql":
        return cast(func.json_agg(column), Text)
    return func.json_group_array(column, type_=Text)


def like_pattern(glob: str) -> str:
    """Turn a `*` glob into a LIKE pattern with `\\` as the escape character."""
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def is_data_error(error: BaseException) -> bool:
    """Return whether the database, or its driver, rejected a statement for the
    values bound to it, rather than failing as a whole (lost connection, lock).

    PostgreSQL reports such values with an SQLSTATE of class 22 ("data
    exception"). asyncpg 0.32 reports 22000 for a value it cannot encode, such
    as an int out of range. The SQLite driver raises OverflowError or
    UnicodeEncodeError before the statement runs, or sqlite3.DataError.
    """
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return False
        sqlstate = getattr(error.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith("22"):
            return True
        return isinstance(error, DataError)
    return isinstance(error, (OverflowError, UnicodeError))


def before_nul(text: str) -> str:
    """Return `text` up to its first NUL, which PostgreSQL cannot compare.

    For a `last` pagination bound the result is the same: names and tags
    contain no control characters, so the names after "a<NUL>b" are exactly
    those after "a".
    """
    return text.partition("\x00")[0]


class InNetwork(FunctionElement[bool]):
    """SQL condition `InNetwork(address, network)`: true when the text `address`
    is an IP address inside the CIDR text `network`.

    PostgreSQL compares the two as inet and cidr; SQLite calls the Python
    function that `configure_sqlite` registers (`sqlite_in_network`). Text that
    is not an address, such as `local` for command-line events, never matches.
    """

    type = Boolean()
    inherit_cache = True
    name = "in_network"


@compiles(InNetwork, "postgresql")
def _in_network_postgresql(element: InNetwork, compiler: Any, **kw: Any) -> str:
    address, network = (compiler.process(part, **kw) for part in element.clauses)
    # CASE keeps the cast away from text that is not an address, which
    # would make it fail.
    return (
        f"(CASE WHEN {address} ~ '^[0-9A-Fa-f:.]+$' "
        f"THEN CAST({address} AS inet) <<= CAST({network} AS cidr) ELSE false END)"
    )


@compiles(InNetwork, "sqlite")
def _in_network_sqlite(element: InNetwork, compiler: Any, **kw: Any) -> str:
    return f"moorage_in_network({compiler.process(element.clauses, **kw)})"


@functools.lru_cache(maxsize=16)
def _parse_network(network: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(network, strict=False)


def sqlite_in_network(address: str | None, network: str) -> int | None:
    """Return 1 when `address` is in `network`, 0 when not or when `address`
    is not an IP address; registered in SQLite as `moorage_in_network`."""
    if address is None:
        return None
    try:
        return int(ipaddress.ip_address(address) in _parse_network(network))
    except ValueError:
        return 0
