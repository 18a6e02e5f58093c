"""Ids of customers, accounts, grants and personal access tokens are never
handed out twice, even after the newest row is deleted.

Runs on SQLite, or on PostgreSQL with MOORAGE_TEST_DATABASE=postgresql.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete

from moorage.db.engine import create_engine, migrate
from moorage.db.identity_store import IdentityStore
from moorage.db.schema import customers, namespaces
from moorage.db.transactions import begin
from tests.support.database import create_database, drop_database


@pytest.fixture
async def identity(tmp_path: Path) -> AsyncIterator[IdentityStore]:
    url = create_database(tmp_path)
    engine = create_engine(url)
    await migrate(engine)
    store = IdentityStore(engine)
    yield store
    store.close()
    await engine.dispose()
    drop_database(url)


async def add_account(identity: IdentityStore, login: str, customer_id: int) -> int:
    return await identity.create_account(
        login=login,
        customer_id=customer_id,
        kind="robot",
        role="reader",
        secret_hash="hash",
    )


async def test_grant_id_not_reused(identity: IdentityStore) -> None:
    customer = await identity.create_customer("acme", "Acme", None)
    await identity.add_grant(customer.id, None, "acme/a", "reader", None)
    newest = await identity.add_grant(customer.id, None, "acme/b", "reader", None)
    assert await identity.remove_grant(customer.id, newest)
    following = await identity.add_grant(customer.id, None, "acme/c", "reader", None)
    assert following > newest


async def test_account_id_not_reused(identity: IdentityStore) -> None:
    customer = await identity.create_customer("acme", "Acme", None)
    await add_account(identity, "acme+first", customer.id)
    newest = await add_account(identity, "acme+second", customer.id)
    await identity.delete_account(newest)
    following = await add_account(identity, "acme+third", customer.id)
    assert following > newest


async def test_personal_token_id_not_reused(identity: IdentityStore) -> None:
    """Deleting an account deletes its tokens, and their ids stay used."""
    customer = await identity.create_customer("acme", "Acme", None)
    keeper = await add_account(identity, "keeper", customer.id)
    leaver = await add_account(identity, "leaver", customer.id)
    await identity.add_personal_token(keeper, "a", "hash", "reader", None)
    newest = await identity.add_personal_token(leaver, "b", "hash", "reader", None)
    await identity.delete_account(leaver)
    following = await identity.add_personal_token(keeper, "c", "hash", "reader", None)
    assert following > newest


async def test_customer_id_not_reused(identity: IdentityStore) -> None:
    """No command deletes a customer yet, but the table keeps its ids regardless."""
    await identity.create_customer("acme", "Acme", None)
    newest = await identity.create_customer("globex", "Globex", None)
    async with begin(identity.engine) as connection:
        await connection.execute(
            delete(namespaces).where(namespaces.c.customer_id == newest.id)
        )
        await connection.execute(delete(customers).where(customers.c.id == newest.id))
    following = await identity.create_customer("initech", "Initech", None)
    assert following.id > newest.id
