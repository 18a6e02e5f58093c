"""The migration history: one head, and the same schema whether a database is
new or was stamped at the seven heads the history had before merge revision 0006.

Runs on SQLite, or on PostgreSQL with MOORAGE_TEST_DATABASE=postgresql.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage import admin
from moorage.audit.log import DatabaseAuditLog
from moorage.audit.recorder import AdminRecorder, local_actor
from moorage.db.audit_store import AuditStore
from moorage.db.engine import MIGRATIONS_DIR, create_engine, head_revisions, migrate
from moorage.db.identity_store import IdentityStore
from moorage.db.schema import metadata
from moorage.errors import NotFoundError
from tests.support.database import create_database, drop_database

# The heads of the history before merge revision 0006.
OLD_HEADS = (
    "0003",
    "0005_benchscale",
    "0005_perf",
    "0005_shred",
    "0005_tokens_pat",
    "0005_tokens_refresh",
    "0005_tokens_throttle",
)
# A grant id no test reaches, within PostgreSQL's 32-bit INTEGER.
NEVER_USED_ID = 2**31 - 1
# Indexes on expressions (COLLATE "C"), which autogenerate cannot compare.
EXPRESSION_INDEXES = {"ix_repositories_name_c", "ix_tags_repository_id_name_c"}


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[Callable[[str], AsyncEngine]]:
    """Create empty databases on demand, one per name, and drop them afterwards."""
    urls: list[str] = []
    created: list[AsyncEngine] = []

    def make(name: str) -> AsyncEngine:
        data_dir = tmp_path / name
        data_dir.mkdir()
        urls.append(create_database(data_dir))
        created.append(create_engine(urls[-1]))
        return created[-1]

    yield make
    for engine in created:
        await engine.dispose()
    for url in urls:
        drop_database(url)


def upgrade_to(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def current_heads(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


def schema_differences(connection: Connection) -> list[Any]:
    """Return what autogenerate would change to make the database match schema.py."""

    def include(obj: Any, name: str | None, kind: str, *_: Any) -> bool:
        return not (kind == "index" and name in EXPRESSION_INDEXES)

    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": include}
    )
    with warnings.catch_warnings():
        # SQLite warns that it skips them, before include_object is asked.
        warnings.filterwarnings(
            "ignore", "autogenerate skipping metadata-specified expression-based"
        )
        return list(compare_metadata(context, metadata))


def schema_snapshot(connection: Connection) -> dict[str, Any]:
    """Describe every table, column, key, index and trigger, comparably."""
    inspector = inspect(connection)
    tables: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        tables[table] = {
            "columns": [
                (column["name"], str(column["type"]), column["nullable"])
                for column in inspector.get_columns(table)
            ],
            "primary key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign keys": sorted(
                (key["name"], tuple(key["constrained_columns"]), key["referred_table"])
                for key in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (index["name"], str(index["column_names"]), index["unique"])
                for index in inspector.get_indexes(table)
            ),
            "unique": sorted(
                (unique["name"], tuple(unique["column_names"]))
                for unique in inspector.get_unique_constraints(table)
            ),
        }
    return {"tables": tables, "objects": _schema_objects(connection)}


def _schema_objects(connection: Connection) -> list[tuple[Any, ...]]:
    if connection.dialect.name == "postgresql":
        rows = connection.execute(
            text(
                "SELECT trigger_name, event_manipulation, event_object_table, "
                "action_statement FROM information_schema.triggers "
                "ORDER BY trigger_name, event_manipulation"
            )
        )
        return [tuple(row) for row in rows]
    # The CREATE statements, which show AUTOINCREMENT, and the triggers. A
    # rebuilt table lists its constraints in any order, so the lines are sorted.
    rows = connection.execute(
        text("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    )
    objects = []
    for kind, name, sql in rows:
        lines = sorted(line.strip(" ,\t") for line in (sql or "").split("\n"))
        objects.append((kind, name, tuple(lines)))
    return objects


async def remove_grants_audited(
    engine: AsyncEngine, identity: IdentityStore, grant_ids: list[int]
) -> None:
    """Remove grants of acme as the command line does, each with its audit event."""
    store = AuditStore(engine)
    recorder = AdminRecorder(DatabaseAuditLog(store, None), local_actor("test"))
    try:
        for grant_id in grant_ids:
            with contextlib.suppress(NotFoundError):
                await admin.remove_grant(identity, "acme", grant_id, audit=recorder)
    finally:
        store.close()


async def identity_revision(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(
            text("SELECT revision FROM identity_revision WHERE id = 1")
        )
    return int(value)


def test_history_has_one_head() -> None:
    """Every revision but one is revised by another, so `upgrade head` works."""
    heads = head_revisions()
    assert len(heads) == 1, f"migration heads: {sorted(heads)}"


async def test_new_database_matches_schema(
    engines: Callable[[str], AsyncEngine],
) -> None:
    """A new database reaches the one head, with the tables schema.py defines."""
    engine = engines("new")
    applied = await migrate(engine)
    assert set(applied) == head_revisions()
    async with engine.connect() as connection:
        assert await connection.run_sync(current_heads) == head_revisions()
        assert await connection.run_sync(schema_differences) == []
        if connection.dialect.name == "sqlite":
            # migrate turns enforcement off while it runs, and on again.
            enforced = await connection.exec_driver_sql("PRAGMA foreign_keys")
            assert enforced.scalar() == 1
    assert await migrate(engine) == []


async def test_upgrade_from_old_heads(engines: Callable[[str], AsyncEngine]) -> None:
    """A database at the seven old heads upgrades to the one head, keeps its
    rows, and ends with the schema of a new database."""
    old = engines("old")
    for head in OLD_HEADS:
        async with old.begin() as connection:
            await connection.run_sync(upgrade_to, head)
    async with old.connect() as connection:
        assert await connection.run_sync(current_heads) == set(OLD_HEADS)

    identity = IdentityStore(old)
    customer = await identity.create_customer("acme", "Acme", None)
    account_id = await identity.create_account(
        login="alice",
        customer_id=customer.id,
        kind="user",
        role="owner",
        secret_hash="hash",
    )
    first = await identity.add_grant(customer.id, None, "acme/*", "reader", None)
    second = await identity.add_grant(
        customer.id, account_id, "acme/app", "writer", None
    )
    removed = await identity.add_grant(customer.id, None, "acme/old", "reader", None)
    await remove_grants_audited(old, identity, [removed, NEVER_USED_ID])
    identity.close()

    applied = await migrate(old)
    assert set(applied) == head_revisions()

    new = engines("new")
    await migrate(new)
    async with old.connect() as connection:
        assert await connection.run_sync(current_heads) == head_revisions()
        assert await connection.run_sync(schema_differences) == []
        old_schema = await connection.run_sync(schema_snapshot)
    async with new.connect() as connection:
        new_schema = await connection.run_sync(schema_snapshot)
    assert old_schema["tables"] == new_schema["tables"]
    only_old = set(old_schema["objects"]) - set(new_schema["objects"])
    only_new = set(new_schema["objects"]) - set(old_schema["objects"])
    assert not only_old, f"only in the upgraded database: {sorted(only_old)}"
    assert not only_new, f"only in the new database: {sorted(only_new)}"

    # The audit table, rebuilt on SQLite, keeps its events and their chain.
    audit_store = AuditStore(old)
    try:
        verification = await DatabaseAuditLog(audit_store, None).verify()
        assert verification.ok, verification.problem
        assert verification.events == 2
    finally:
        audit_store.close()

    identity = IdentityStore(old)
    try:
        assert (await identity.get_customer("acme")).id == customer.id
        account = await identity.find_account("alice")
        assert account is not None
        assert account.id == account_id
        grants = await identity.list_grants(customer.id)
        assert [grant.id for grant in grants] == [first, second]
        # The rebuilt tables still change the identity revision.
        before = await identity_revision(old)
        added = await identity.add_grant(
            customer.id, None, "acme/tools", "reader", None
        )
        assert await identity_revision(old) > before
        # A grant removed before the upgrade keeps its id, because its audit
        # event names it. The failed removal of NEVER_USED_ID is no reason to skip.
        assert added == removed + 1
    finally:
        identity.close()


async def test_audit_events_indexes(engines: Callable[[str], AsyncEngine]) -> None:
    """Each event inserts into as few B-trees as the queries need. On SQLite
    `seq` is the rowid, so the table has only its two secondary indexes."""
    engine = engines("audit")
    await migrate(engine)
    async with engine.connect() as connection:
        dialect = connection.dialect.name
        indexes = await connection.run_sync(
            lambda sync: inspect(sync).get_indexes("audit_events")
        )
        if dialect == "sqlite":
            listed = await connection.exec_driver_sql(
                "SELECT name FROM pragma_index_list('audit_events')"
            )
            btrees = sorted(row[0] for row in listed)
    names = sorted(index["name"] for index in indexes)
    assert names == ["ix_audit_events_action_time", "ix_audit_events_time"]
    if dialect == "sqlite":
        # A BIGINT primary key would add sqlite_autoindex_audit_events_1.
        assert btrees == ["ix_audit_events_action_time", "ix_audit_events_time"]
