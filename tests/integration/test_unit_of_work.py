"""Store calls inside a unit of work share one transaction on a real database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from moorage.config import Settings
from moorage.db.schema import customers
from moorage.db.transactions import unit_of_work
from moorage.errors import NotFoundError
from moorage.services import Services, open_services
from tests.support.database import create_database, drop_database


class ChangeAbandonedError(Exception):
    """Raised by a test to abandon a unit of work halfway."""


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = create_database(data_dir)
    yield Settings(data_dir=data_dir, database_url=url)
    drop_database(url)


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    opened = await open_services(settings)
    yield opened
    await opened.close()


async def _customer_exists(services: Services, slug: str) -> bool:
    try:
        await services.identity.get_customer(slug)
    except NotFoundError:
        return False
    return True


async def test_unit_commits_every_call(services: Services) -> None:
    """Writes from two stores inside one unit are all stored after it ends."""
    async with unit_of_work(services.engine):
        customer = await services.identity.create_customer("acme", "Acme", None)
        await services.identity.add_grant(
            customer.id, None, "products/*", "reader", None
        )
        await services.registry.store.create_upload("acme/app")

    assert await _customer_exists(services, "acme")
    assert len(await services.identity.list_grants(customer.id)) == 1


async def test_unit_rolls_back_every_call(services: Services) -> None:
    """An error after several writes leaves none of them behind."""

    async def abandon_halfway() -> None:
        async with unit_of_work(services.engine):
            customer = await services.identity.create_customer("acme", "Acme", None)
            await services.identity.add_grant(
                customer.id, None, "products/*", "reader", None
            )
            raise ChangeAbandonedError

    with pytest.raises(ChangeAbandonedError):
        await abandon_halfway()

    assert not await _customer_exists(services, "acme")
    assert await services.identity.list_customers() == []


async def test_unit_reads_its_own_writes(services: Services) -> None:
    """Reads inside the unit see its writes; other connections see them at commit."""
    async with unit_of_work(services.engine):
        await services.identity.create_customer("acme", "Acme", None)
        seen_inside = await _customer_exists(services, "acme")
        seen_elsewhere = await _count_customers(services, "acme")

    assert seen_inside
    assert seen_elsewhere == 0
    assert await _count_customers(services, "acme") == 1


async def _count_customers(services: Services, slug: str) -> int:
    """Count customers named `slug` on a connection of its own, outside any unit."""
    async with services.engine.connect() as connection:
        found = await connection.scalar(
            select(func.count()).where(customers.c.slug == slug)
        )
    return int(found or 0)


async def test_nested_unit_raises(services: Services) -> None:
    """A unit opened inside another on the same database raises RuntimeError."""

    async def open_twice() -> None:
        async with unit_of_work(services.engine), unit_of_work(services.engine):
            pass

    with pytest.raises(RuntimeError, match="already open"):
        await open_twice()


async def test_task_inside_unit_raises(services: Services) -> None:
    """A task created inside a unit cannot use the unit's connection."""

    async def list_customers() -> object:
        return await services.identity.list_customers()

    async with unit_of_work(services.engine):
        await services.identity.create_customer("acme", "Acme", None)
        with pytest.raises(RuntimeError, match="task created inside a unit"):
            await asyncio.create_task(list_customers())

    assert await _customer_exists(services, "acme")


async def test_task_outlives_unit(services: Services) -> None:
    """A task created inside a unit uses its own connection after the unit ends."""
    go_on = asyncio.Event()

    async def create_later() -> None:
        await go_on.wait()
        await services.identity.create_customer("late", "Late", None)

    async with unit_of_work(services.engine):
        await services.identity.create_customer("acme", "Acme", None)
        later = asyncio.create_task(create_later())
    go_on.set()
    await later

    assert await _customer_exists(services, "late")
