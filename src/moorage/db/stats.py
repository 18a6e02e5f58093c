"""Figures for the metrics endpoint: stored bytes per customer, open uploads."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.schema import (
    blobs,
    customers,
    namespaces,
    repositories,
    repository_blobs,
    uploads,
)
from moorage.db.transactions import connect

VENDOR = "vendor"


async def stored_bytes_by_customer(engine: AsyncEngine) -> dict[str, int]:
    """Sum the sizes of the distinct blobs in each customer's namespaces.

    A blob in two repositories of the same customer counts once; a blob shared
    by two customers counts for each. Vendor namespaces are reported as
    "vendor".
    """
    linked = (
        select(namespaces.c.customer_id, repository_blobs.c.digest)
        .select_from(
            repository_blobs.join(
                repositories, repositories.c.id == repository_blobs.c.repository_id
            ).join(namespaces, namespaces.c.name == repositories.c.namespace)
        )
        .distinct()
        .subquery()
    )
    query = (
        select(customers.c.slug, func.sum(blobs.c.size))
        .select_from(
            linked.join(blobs, blobs.c.digest == linked.c.digest).outerjoin(
                customers, customers.c.id == linked.c.customer_id
            )
        )
        .group_by(customers.c.slug)
    )
    async with connect(engine) as connection:
        rows = await connection.execute(query)
        return {(slug or VENDOR): int(total or 0) for slug, total in rows}


async def customer_slugs(engine: AsyncEngine) -> list[str]:
    async with connect(engine) as connection:
        return list(await connection.scalars(select(customers.c.slug)))


async def count_uploads(engine: AsyncEngine) -> int:
    async with connect(engine) as connection:
        return int(
            await connection.scalar(select(func.count()).select_from(uploads)) or 0
        )
