"""Catalog and tag list pages read an index range, not every row.

Each test loads enough rows that a full scan would be the planner's last
choice, captures the statement a page runs, and reads its plan with SQLite's
EXPLAIN QUERY PLAN or PostgreSQL's EXPLAIN (MOORAGE_TEST_DATABASE picks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.engine import create_engine, migrate
from moorage.db.registry_store import RegistryStore, RepositoryFilter
from moorage.db.schema import manifests, repositories, tags, utcnow
from tests.support.database import create_database, drop_database

OTHER_REPOSITORIES = 5_000
TAGS = 5_000


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    url = create_database(tmp_path)
    engine = create_engine(url)
    try:
        await migrate(engine)
        await _load(engine)
        yield engine
    finally:
        await engine.dispose()
        drop_database(url)


async def _load(engine: AsyncEngine) -> None:
    """Add repositories of many customers, a small namespace and a tagged one."""
    now = utcnow()
    names = [f"zz-{i % 50:02d}/app-{i:05d}" for i in range(OTHER_REPOSITORIES)]
    names += [f"acme/app-{i}" for i in range(30)] + ["acme-2/app", "acmf/app"]
    async with engine.begin() as connection:
        await connection.execute(
            insert(repositories),
            [
                {"name": n, "namespace": n.split("/")[0], "created_at": now}
                for n in names
            ],
        )
        tagged = await connection.scalar(
            select(repositories.c.id).where(repositories.c.name == "acme/app-0")
        )
        manifest_id = (
            await connection.execute(
                insert(manifests).returning(manifests.c.id),
                {
                    "repository_id": tagged,
                    "digest": "sha256:" + "0" * 64,
                    "media_type": "application/vnd.oci.image.manifest.v1+json",
                    "size": 2,
                    "content": b"{}",
                    "created_at": now,
                },
            )
        ).scalar_one()
        await connection.execute(
            insert(tags),
            [
                {
                    "repository_id": tagged,
                    "name": f"t{i:05d}",
                    "manifest_id": manifest_id,
                    "updated_at": now,
                }
                for i in range(TAGS)
            ],
        )
        await connection.execute(text("ANALYZE"))


class StatementLog:
    """Collect the SQL statements an engine runs, with their parameters."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.statements: list[tuple[str, Any]] = []
        event.listen(engine.sync_engine, "before_cursor_execute", self._record)

    def _record(self, *arguments: Any) -> None:
        _, _, statement, parameters, _, _ = arguments
        self.statements.append((statement, parameters))

    def last(self, table: str) -> tuple[str, Any]:
        for statement, parameters in reversed(self.statements):
            if f"FROM {table}" in statement:
                return statement, parameters
        raise AssertionError(f"no statement read {table}: {self.statements}")


async def plan_of(engine: AsyncEngine, statement: str, parameters: Any) -> str:
    async with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            rows = await connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
        else:
            rows = await connection.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters
            )
        return "\n".join(str(row[-1]) for row in rows)


def assert_index_range(plan: str, dialect: str) -> None:
    """A page must walk an index in order: no table scan and no sort of all rows."""
    if dialect == "postgresql":
        assert "Seq Scan" not in plan, plan
        assert "Sort" not in plan, plan
        assert "Index" in plan, plan
    else:
        assert "TEMP B-TREE" not in plan, plan
        assert "USING" in plan, plan
        assert "INDEX" in plan, plan


CATALOG_CASES = [
    ("everything, first page", RepositoryFilter(everything=True), None),
    ("everything, after a name", RepositoryFilter(everything=True), "zz-10/app-00010"),
    ("one namespace, first page", RepositoryFilter(patterns=("acme/*",)), None),
    (
        "one namespace, after a name",
        RepositoryFilter(patterns=("acme/*",)),
        "acme/app-5",
    ),
]


@pytest.mark.parametrize(
    ("access", "last"),
    [(access, last) for _, access, last in CATALOG_CASES],
    ids=[case[0] for case in CATALOG_CASES],
)
async def test_catalog_page_uses_index(
    engine: AsyncEngine, access: RepositoryFilter, last: str | None
) -> None:
    """Every catalog page reads a range of the name index."""
    store = RegistryStore(engine)
    log = StatementLog(engine)

    await store.list_repositories(access, 101, last)

    plan = await plan_of(engine, *log.last("repositories"))
    assert_index_range(plan, engine.dialect.name)
    if access.patterns:
        # The namespace's range, not the whole index from `last` on.
        if engine.dialect.name == "postgresql":
            assert "Index Cond" in plan, plan
            assert "acme0" in plan, plan
        else:
            assert "SEARCH" in plan, plan
            assert "name<?" in plan, plan


async def test_tag_page_uses_index(engine: AsyncEngine) -> None:
    """A tag list page reads a range of the repository's tags in order."""
    store = RegistryStore(engine)
    # A direct SQLite read runs the same statement outside the engine's log.
    store.direct = None
    log = StatementLog(engine)

    await store.list_tags("acme/app-0", 100, "t02500")

    plan = await plan_of(engine, *log.last("tags"))
    assert_index_range(plan, engine.dialect.name)


TAG_PAGE_CASES = [
    ("every tag", "acme/app-0", None, None, [f"t{i:05d}" for i in range(TAGS)]),
    ("first page", "acme/app-0", 3, None, ["t00000", "t00001", "t00002"]),
    ("after a tag", "acme/app-0", 2, "t00010", ["t00011", "t00012"]),
    ("rest after a tag", "acme/app-0", None, "t04997", ["t04998", "t04999"]),
    ("between two tags", "acme/app-0", 1, "t00010a", ["t00011"]),
    ("last beyond the end", "acme/app-0", 10, "t99999", []),
    ("last is the end", "acme/app-0", None, "t04999", []),
    ("zero", "acme/app-0", 0, None, []),
    ("NUL in last", "acme/app-0", 1, "t00010\x00z", ["t00011"]),
    ("repository without tags", "acme/app-1", 10, None, []),
    ("repository without tags, zero", "acme/app-1", 0, None, []),
    ("no such repository", "nobody/app", 10, None, None),
    ("no such repository, zero", "nobody/app", 0, None, None),
    ("no such repository, no limit", "nobody/app", None, "t00001", None),
]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "engine"])
@pytest.mark.parametrize(
    ("repository", "limit", "last", "expected"),
    [case[1:] for case in TAG_PAGE_CASES],
    ids=[case[0] for case in TAG_PAGE_CASES],
)
async def test_tag_pages(
    engine: AsyncEngine,
    direct: bool,
    repository: str,
    limit: int | None,
    last: str | None,
    expected: list[str] | None,
) -> None:
    """A tag page contains the tags after `last`, or is None for no repository."""
    store = RegistryStore(engine)
    if not direct:
        store.direct = None
    elif store.direct is None:
        pytest.skip("direct reads exist for SQLite files only")

    found = await store.list_tags(repository, limit, last)

    assert found == expected


async def test_catalog_pages_match_namespace(engine: AsyncEngine) -> None:
    """Pages of a namespace list exactly its names, in order, and stop at its end."""
    store = RegistryStore(engine)
    access = RepositoryFilter(patterns=("acme/*", "acmf/app"))
    expected = sorted([f"acme/app-{i}" for i in range(30)] + ["acmf/app"])

    found: list[str] = []
    last = None
    while True:
        page = await store.list_repositories(access, 7, last)
        found += page
        if len(page) < 7:
            break
        last = page[-1]

    assert found == expected


async def test_catalog_glob_inside_name(engine: AsyncEngine) -> None:
    """A glob with a literal part after the prefix still matches by LIKE."""
    store = RegistryStore(engine)

    found = await store.list_repositories(
        RepositoryFilter(patterns=("acme*/app",)), 100, None
    )

    assert found == ["acme-2/app"]
