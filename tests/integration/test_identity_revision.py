"""The identity revision: every identity change moves it, and caches follow it.

Servers keep accounts, grants and personal access tokens in memory while the
revision in the database stays the same. So each write to an identity table
must move the revision. Every worker process must then see a change made by
another process on its next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, text, update

from moorage import admin
from moorage.config import Settings
from moorage.db.identity_revision import SharedQueryReader, query_revision
from moorage.db.schema import (
    IDENTITY_TABLES,
    accounts,
    customers,
    grants,
    namespaces,
    personal_tokens,
    utcnow,
)
from moorage.services import Services, open_services
from tests.support.database import create_database, drop_database
from tests.support.identity import bearer, get_token
from tests.support.server import ServerProcess, running_server, unique


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    url = create_database(tmp_path)
    opened = await open_services(Settings(data_dir=tmp_path, database_url=url))
    try:
        yield opened
    finally:
        await opened.close()
        drop_database(url)


async def _revision(services: Services) -> int:
    return await query_revision(services.engine)


async def test_every_identity_write_moves_revision(services: Services) -> None:
    """Insert, update and delete on each identity table increase the revision."""
    identity = services.identity
    seen = [await _revision(services)]

    async def moved(step: str) -> None:
        now = await _revision(services)
        assert now > seen[-1], f"{step} left the identity revision at {now}"
        seen.append(now)

    slug = unique("rev")
    customer = await admin.add_customer(identity, slug, slug, None)
    await moved("adding a customer and its namespace")
    created = await admin.add_user(identity, slug, "alice", "reader")
    await moved("adding an account")
    grant_id = await admin.add_grant(identity, slug, "products/*", "reader", None)
    await moved("adding a grant")
    token = await admin.add_personal_token(
        identity, slug, created.login, "ci", "reader", None
    )
    await moved("adding a personal access token")

    async with services.engine.begin() as connection:
        await connection.execute(
            namespaces.insert().values(
                name=unique("extra"), customer_id=customer.id, created_at=utcnow()
            )
        )
    await moved("adding a namespace")
    changes = [
        update(customers).where(customers.c.id == customer.id).values(status="x"),
        update(namespaces)
        .where(namespaces.c.customer_id == customer.id)
        .values(customer_id=customer.id),
        update(accounts).where(accounts.c.login == created.login).values(role="writer"),
        update(grants).where(grants.c.id == grant_id).values(role="writer"),
        update(personal_tokens)
        .where(personal_tokens.c.id == token.id)
        .values(role="writer"),
        delete(personal_tokens).where(personal_tokens.c.id == token.id),
        delete(grants).where(grants.c.id == grant_id),
        delete(accounts).where(accounts.c.login == created.login),
        delete(namespaces).where(namespaces.c.customer_id == customer.id),
        delete(customers).where(customers.c.id == customer.id),
    ]
    for change in changes:
        async with services.engine.begin() as connection:
            await connection.execute(change)
        await moved(str(change).split("\n", 1)[0])


async def test_every_identity_table_has_trigger(services: Services) -> None:
    """Each table in IDENTITY_TABLES has a trigger that moves the revision."""
    async with services.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            rows = await connection.execute(
                text(
                    "SELECT event_object_table FROM information_schema.triggers "
                    "WHERE action_statement LIKE '%bump_identity_revision%'"
                )
            )
        else:
            rows = await connection.execute(
                text(
                    "SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' "
                    "AND name LIKE '%bump_identity_revision'"
                )
            )
        triggered = {row[0] for row in rows}
    assert triggered == set(IDENTITY_TABLES)


async def test_shared_query_sees_later_commits(services: Services) -> None:
    """Callers that share one query never get a revision older than their call."""
    reader = SharedQueryReader(services.engine)
    before = await reader.current()
    slug = unique("rev")
    await admin.add_customer(services.identity, slug, slug, None)
    answers = await asyncio.gather(*(reader.current() for _ in range(20)))
    assert min(answers) > before


async def test_cached_access_follows_changes(services: Services) -> None:
    """account_access returns the new state after a change from another
    connection, although the same state was cached just before."""
    identity = services.identity
    slug = unique("rev")
    await admin.add_customer(identity, slug, slug, None)
    created = await admin.add_user(identity, slug, "bob", "reader")
    first = await identity.account_access(created.login)
    assert first is not None
    assert await identity.account_access(created.login) is first
    await admin.add_grant(identity, slug, "products/app", "reader", None)
    after_grant = await identity.account_access(created.login)
    assert after_grant is not None
    assert [grant.pattern for grant in after_grant.grants] == ["products/app"]
    async with services.engine.begin() as connection:
        await connection.execute(
            update(accounts)
            .where(accounts.c.login == created.login)
            .values(disabled=True)
        )
    disabled = await identity.account_access(created.login)
    assert disabled is not None
    assert disabled.account.disabled


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data", {"MOORAGE_WORKERS": "2"}) as server:
        yield server


def test_revocation_reaches_every_worker(two_workers: ServerProcess) -> None:
    """Disabling an account from another process rejects its token in every
    worker on the next request, after every worker has cached the account."""
    server = two_workers
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    name = f"{customer}/app"
    headers = bearer(get_token(server, login, password, f"repository:{name}:pull"))
    # New connections spread over both workers, which cache token and account.
    before = {
        httpx.get(f"{server.url}/v2/{name}/tags/list", headers=headers).status_code
        for _ in range(30)
    }
    assert before == {404}
    server.run_admin(
        lambda s: admin.set_enabled(s.identity, customer, login, "user", False)
    )
    after = [
        httpx.get(f"{server.url}/v2/{name}/tags/list", headers=headers).status_code
        for _ in range(30)
    ]
    assert set(after) == {401}
