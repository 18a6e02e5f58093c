"""The audit writer's SQLite time text against what a Core insert stores, and
the adapter that binds None."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, text

import moorage.db.engine  # noqa: F401 (registers the adapter for None)
from moorage.audit.events import AuditEvent, format_time
from moorage.db.audit_store import (
    _ROW_COLUMNS,
    _sqlite_time,
    _statement_sizes,
    sqlite_time,
)
from moorage.db.schema import audit_events


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        datetime(1000, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 12, 5, 8, 0, 0, 10, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 0, 0, 500000, tzinfo=timezone(timedelta(hours=9))),
        datetime(2026, 3, 1, 12, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_sqlite_time_equals_core_insert(value: datetime) -> None:
    """The text bound for an audit event's time is the text SQLAlchemy stores."""
    engine = create_engine("sqlite://")
    audit_events.create(engine)
    row = {
        "seq": 1,
        "time": value,
        "action": "manifest.pull",
        "outcome": "success",
        "prev_hash": "0" * 64,
        "hash": "1" * 64,
    }
    with engine.begin() as connection:
        connection.execute(audit_events.insert(), row)
        stored = connection.scalar(text("SELECT time FROM audit_events"))
    engine.dispose()
    assert stored == sqlite_time(value)
    event = AuditEvent("manifest.pull", time=value)
    assert _sqlite_time(format_time(value), event) == stored


def random_times(seed: int, count: int = 5000) -> Iterator[datetime]:
    """Yield `count` UTC times spread over datetime's whole range, one in five
    with a microsecond of 0, 1 or 999999."""
    generator = random.Random(seed)  # noqa: S311 (test data)
    smallest = datetime(1, 1, 1, tzinfo=UTC)
    span = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - smallest
    for _ in range(count):
        value = smallest + span * generator.random()
        if generator.random() < 0.2:
            value = value.replace(microsecond=generator.choice([0, 1, 999999]))
        yield value


def test_sqlite_time_of_random_times() -> None:
    """The orjson path gives isoformat's text for times across the whole range."""
    for value in random_times(4):
        assert sqlite_time(value) == value.isoformat(" ", "microseconds")[:-6]


def test_sqlite_time_from_format_time_random() -> None:
    """The time cut from the hashed text equals `sqlite_time` across the range."""
    for value in random_times(5):
        event = AuditEvent("manifest.pull", time=value)
        assert _sqlite_time(format_time(value), event) == sqlite_time(value)


def test_sqlite_insert_names_every_column_once() -> None:
    """The writer's inserts bind every column of the table once."""
    assert sorted(_ROW_COLUMNS) == sorted(audit_events.c.keys())


@pytest.mark.parametrize("rows", [0, 1, 5, 127, 128, 129, 1000, 2000])
def test_statement_sizes_cover_rows(rows: int) -> None:
    """A batch splits into full statements, then a few powers of two."""
    sizes = _statement_sizes(rows, 128)
    assert sum(sizes) == rows
    assert all(size == 128 or size & (size - 1) == 0 for size in sizes)
    below = [size for size in sizes if size != 128]
    assert len(below) == len(set(below))


def test_none_binds_as_null() -> None:
    """The process-wide adapter for None that moorage.db.engine registers
    still stores SQL NULL, next to values of other types."""
    with contextlib.closing(sqlite3.connect(":memory:")) as connection:
        connection.execute("CREATE TABLE t (a, b, c)")
        connection.execute("INSERT INTO t VALUES (?, ?, ?)", (None, "x", None))
        row = connection.execute(
            "SELECT a IS NULL, typeof(b), c IS NULL FROM t"
        ).fetchone()
    assert row == (1, "text", 1)
