"""Dump the metadata tables in one read transaction, and load them back.

Each table becomes a gzip'd file of JSON lines, one row a line, so that a
backup of SQLite restores into PostgreSQL and the other way round. Values are
JSON as they are, except bytes (`{"b": base64}`) and timestamps
(`{"t": ISO 8601}`, naive UTC as stored).

Rows are read and written through tables reflected from the database itself,
not through `moorage.db.schema`, because a backup's revision may be older than
this version's schema. A restore creates the schema at the backup's revision,
loads the rows, and then migrates to the newest revision.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    MetaData,
    Table,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from moorage.db.engine import _alembic_config
from moorage.db.schema import blobs
from moorage.errors import BackupError
from moorage.fsync import create_private_file

# Tables a backup leaves out, and why (docs/backup.md repeats this).
SKIPPED_TABLES = {
    # The revision is recorded in the backup itself.
    "alembic_version",
    # Upload sessions in progress: their data is not backed up; clients start
    # an interrupted push again.
    "uploads",
    # Failed-login counters and the addresses of recent logins: short-lived
    # throttle state. A restored installation starts with none, as after
    # `moorage login unlock`.
    "login_failures",
    "login_addresses",
    # Which process runs garbage collection now: a restored lease would hold
    # off every run of the new installation until it expired.
    "maintenance_leases",
}
_BATCH = 500
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TableEntry:
    """One table's file in a backup, and the columns of its rows."""

    name: str
    file: str
    sha256: str
    size: int
    rows: int
    columns: list[str]


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Snapshot:
    """The revision, blob list, key ids and counts read by a dump, besides the
    table files."""

    revision: str
    dialect: str
    tables: list[TableEntry] = field(default_factory=list)
    # (digest, size) of each blob whose content is readable (not shredded).
    blobs: list[tuple[str, int]] = field(default_factory=list)
    shredded_blobs: int = 0
    key_ids: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)
    # The highest id each table's id sequence handed out, so that a restored
    # installation never gives a new row the id of a deleted one.
    sequences: dict[str, int] = field(default_factory=dict)


def encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "b" in value:
            return base64.b64decode(value["b"])
        if "t" in value:
            return datetime.fromisoformat(value["t"])
    return value


async def dump(engine: AsyncEngine, directory: Path) -> Snapshot:
    """Write every table (but SKIPPED_TABLES) into `directory`, all read in one
    read-only transaction, so that the files show one moment of the database."""
    async with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            return await _dump_sqlite(connection, directory)
        async with connection.begin():
            await connection.exec_driver_sql(
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"
            )
            return await connection.run_sync(_dump, directory)


async def _dump_sqlite(connection: AsyncConnection, directory: Path) -> Snapshot:
    """Read in one SQLite transaction: in WAL mode, its first read fixes the
    snapshot that every later read sees, while the server goes on writing."""
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    previous = driver.isolation_level
    # Python's sqlite3 module begins no transaction before a SELECT; with its
    # own handling off, the BEGIN below covers every read.
    driver.isolation_level = None
    try:
        await connection.exec_driver_sql("BEGIN")
        try:
            return await connection.run_sync(_dump, directory)
        finally:
            await connection.exec_driver_sql("ROLLBACK")
    finally:
        driver.isolation_level = previous


def _dump(connection: Connection, directory: Path) -> Snapshot:
    revisions = connection.execute(text("SELECT version_num FROM alembic_version"))
    heads = [row[0] for row in revisions]
    if len(heads) != 1:
        raise BackupError(
            f"the database is at {len(heads)} revisions ({', '.join(heads)}); "
            "run `moorage init` to migrate it first"
        )
    snapshot = Snapshot(revision=heads[0], dialect=connection.dialect.name)
    metadata = MetaData()
    metadata.reflect(connection)
    for table in metadata.sorted_tables:
        if table.name in SKIPPED_TABLES:
            continue
        snapshot.tables.append(_dump_table(connection, table, directory, snapshot))
    snapshot.sequences = _read_sequences(connection, metadata)
    return snapshot


def _dump_table(
    connection: Connection, table: Table, directory: Path, snapshot: Snapshot
) -> TableEntry:
    columns = [column.name for column in table.columns]
    order = list(table.primary_key.columns) or list(table.columns)
    observe = _OBSERVERS.get(table.name)
    name = f"{table.name}.jsonl.gz"
    path = directory / name
    rows = 0
    # mtime=0 keeps the header free of the time of writing.
    with (
        create_private_file(path) as file,
        gzip.GzipFile(fileobj=file, mode="wb", mtime=0) as packed,
    ):
        for row in _pages(connection, table, order):
            values = row._mapping
            if observe is not None:
                observe(snapshot, values)
            line = [encode(values[column]) for column in columns]
            packed.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            rows += 1
    snapshot.counts[table.name] = rows
    return TableEntry(
        name=table.name,
        file=f"tables/{name}",
        sha256=sha256_of_file(path),
        size=path.stat().st_size,
        rows=rows,
        columns=columns,
    )


def _pages(connection: Connection, table: Table, order: list[Any]) -> Iterator[Any]:
    """Yield every row in key order, a page at a time (keyset pagination: the
    async drivers offer no server-side cursor here)."""
    query = select(table).order_by(*order).limit(_BATCH)
    last: tuple[Any, ...] | None = None
    while True:
        page = query
        if last is not None:
            page = query.where(tuple_(*order) > tuple_(*last))
        rows = connection.execute(page).all()
        yield from rows
        if len(rows) < _BATCH:
            return
        last = tuple(rows[-1]._mapping[column.name] for column in order)


def _observe_blob(snapshot: Snapshot, row: Any) -> None:
    if row["shredded_at"] is None:
        snapshot.blobs.append((row["digest"], row["size"]))
    else:
        snapshot.shredded_blobs += 1


def _observe_sealed_key(snapshot: Snapshot, row: Any) -> None:
    snapshot.key_ids.add(row["key_id"])


_OBSERVERS: dict[str, Callable[[Snapshot, Any], None]] = {
    "blobs": _observe_blob,
    "sealed_keys": _observe_sealed_key,
}


def _id_columns(metadata: MetaData) -> Iterator[tuple[str, str]]:
    """Yield (table, column) for each table whose primary key is one integer."""
    for table in metadata.sorted_tables:
        key = list(table.primary_key.columns)
        if len(key) == 1 and _is_integer(key[0].type):
            yield table.name, key[0].name


def _is_integer(type_: Any) -> bool:
    try:
        return type_.python_type is int
    except NotImplementedError:
        return False


def _read_sequences(connection: Connection, metadata: MetaData) -> dict[str, int]:
    if connection.dialect.name == "sqlite":
        if "sqlite_sequence" not in _sqlite_tables(connection):
            return {}
        rows = connection.execute(text("SELECT name, seq FROM sqlite_sequence"))
        return {name: int(seq) for name, seq in rows if seq}
    sequences: dict[str, int] = {}
    for table, column in _id_columns(metadata):
        sequence = _pg_sequence(connection, table, column)
        if sequence is None:
            continue
        last, called = connection.execute(
            text(f"SELECT last_value, is_called FROM {sequence}")  # noqa: S608
        ).one()
        if called:
            sequences[table] = int(last)
    return sequences


def _sqlite_tables(connection: Connection) -> set[str]:
    rows = connection.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))
    return {row[0] for row in rows}


def _pg_sequence(connection: Connection, table: str, column: str) -> str | None:
    return connection.execute(
        text("SELECT pg_get_serial_sequence(:table, :column)"),
        {"table": table, "column": column},
    ).scalar()


def read_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Yield the rows of one table file as column-value mappings."""
    with gzip.open(path, "rb") as file:
        for line in file:
            values = json.loads(line)
            yield {
                column: decode(value)
                for column, value in zip(columns, values, strict=True)
            }


@dataclass(frozen=True, slots=True)
class TableSource:
    entry: TableEntry
    path: Path


async def load(
    engine: AsyncEngine,
    revision: str,
    sources: list[TableSource],
    sequences: dict[str, int],
) -> None:
    """Create the schema at `revision`, load the rows, set the id sequences,
    and migrate to the newest revision, all in one transaction: when any step
    fails, the database is left as empty as it was."""
    async with engine.connect() as connection:
        if engine.dialect.name != "sqlite":
            async with connection.begin():
                await connection.run_sync(_load, revision, sources, sequences)
            return
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        # Off while rows arrive table by table, as during migrations (see
        # moorage.db.engine.migrate); `foreign_key_check` runs before COMMIT.
        await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        await connection.commit()
        driver.isolation_level = None
        try:
            await connection.exec_driver_sql("BEGIN")
            try:
                await connection.run_sync(_load, revision, sources, sequences)
            except BaseException:
                await connection.exec_driver_sql("ROLLBACK")
                raise
            await connection.exec_driver_sql("COMMIT")
        finally:
            driver.isolation_level = ""
            await connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def _load(
    connection: Connection,
    revision: str,
    sources: list[TableSource],
    sequences: dict[str, int],
) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), revision)
    metadata = MetaData()
    metadata.reflect(connection)
    by_name = {source.entry.name: source for source in sources}
    missing = sorted(set(by_name) - set(metadata.tables))
    if missing:
        raise BackupError(
            f"the schema at revision {revision} has no table {', '.join(missing)}"
        )
    ordered = [t for t in metadata.sorted_tables if t.name in by_name]
    # Migrations seed some tables (the audit head, the identity revision).
    for table in reversed(ordered):
        connection.execute(delete(table))
    for table in ordered:
        source = by_name[table.name]
        unknown = set(source.entry.columns) - set(table.columns.keys())
        if unknown:
            raise BackupError(
                f"table {table.name} at revision {revision} has no column "
                f"{', '.join(sorted(unknown))}"
            )
        batch: list[dict[str, Any]] = []
        for row in read_rows(source.path, source.entry.columns):
            batch.append(row)
            if len(batch) == _BATCH:
                connection.execute(insert(table), batch)
                batch = []
        if batch:
            connection.execute(insert(table), batch)
    _set_sequences(connection, metadata, sequences)
    command.upgrade(_alembic_config(connection), "head")
    if connection.dialect.name == "sqlite":
        violations = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
        if violations:
            table, rowid, parent, _ = violations[0]
            raise BackupError(
                f"{len(violations)} restored rows name a row that the backup does "
                f"not hold, such as row {rowid} of {table} (no match in {parent})"
            )


def _set_sequences(
    connection: Connection, metadata: MetaData, sequences: dict[str, int]
) -> None:
    """Make each id sequence start past both the restored rows and the highest
    id the backed-up installation ever handed out."""
    if connection.dialect.name == "sqlite":
        for table, highest in sequences.items():
            connection.execute(
                text("UPDATE sqlite_sequence SET seq = max(seq, :n) WHERE name = :t"),
                {"n": highest, "t": table},
            )
            connection.execute(
                text(
                    "INSERT INTO sqlite_sequence (name, seq) SELECT :t, :n WHERE NOT "
                    "EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = :t) AND "
                    "EXISTS (SELECT 1 FROM sqlite_master WHERE name = :t AND "
                    "sql LIKE '%AUTOINCREMENT%')"
                ),
                {"n": highest, "t": table},
            )
        return
    for table, column in _id_columns(metadata):
        sequence = _pg_sequence(connection, table, column)
        if sequence is None:
            continue
        stored = connection.execute(
            select(func.max(metadata.tables[table].c[column]))
        ).scalar()
        highest = max(stored or 0, sequences.get(table, 0))
        if highest > 0:
            connection.execute(
                text("SELECT setval(CAST(:s AS regclass), :n, true)"),
                {"s": sequence, "n": highest},
            )


async def table_names(engine: AsyncEngine) -> list[str]:
    """Return the names of the tables in the database, for the empty check."""
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: inspect(sync).get_table_names())


async def readable_blobs(engine: AsyncEngine) -> list[tuple[str, int]]:
    """Return (digest, size) of every blob that shredding did not make
    unreadable."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(blobs.c.digest, blobs.c.size).where(blobs.c.shredded_at.is_(None))
        )
        return [(row.digest, row.size) for row in rows]
