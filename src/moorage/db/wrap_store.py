"""Wrapped data keys of stored objects, one per owner (the `data_key_wraps` table).

An owner is the customer whose namespace holds a repository, named
`customer:<slug>`, or the vendor (`vendor`) for every other namespace. The
owner name is also the name of that owner's key-encryption key in `sealed_keys`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import delete, func, select, union
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from moorage.db.dialects import insert_ignore
from moorage.db.schema import (
    customers,
    data_key_wraps,
    manifest_references,
    manifests,
    namespaces,
    repositories,
    repository_blobs,
    uploads,
    utcnow,
)
from moorage.db.transactions import begin, connect
from moorage.names import namespace_of

VENDOR_OWNER = "vendor"
CUSTOMER_OWNER_PREFIX = "customer:"


def customer_owner(slug: str) -> str:
    return CUSTOMER_OWNER_PREFIX + slug


@dataclass(frozen=True, slots=True)
class DataKeyWrap:
    owner: str
    wrapped: bytes


class WrapStore:
    """Queries for wrapped data keys and for the owners of repositories and blobs."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # Wraps

    async def wraps(self, object_id: str) -> list[DataKeyWrap]:
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(data_key_wraps.c.owner, data_key_wraps.c.wrapped)
                .where(data_key_wraps.c.object_id == object_id)
                .order_by(data_key_wraps.c.owner)
            )
            return [DataKeyWrap(row.owner, bytes(row.wrapped)) for row in result]

    async def add(self, object_id: str, wraps: list[DataKeyWrap]) -> None:
        """Store wraps; an owner that already has a wrap for the object keeps it."""
        async with begin(self.engine) as connection:
            for wrap in wraps:
                await insert_ignore(
                    connection,
                    data_key_wraps,
                    {
                        "object_id": object_id,
                        "owner": wrap.owner,
                        "wrapped": wrap.wrapped,
                        "created_at": utcnow(),
                    },
                )

    async def remove_objects(self, object_ids: list[str]) -> None:
        if not object_ids:
            return
        async with begin(self.engine) as connection:
            await connection.execute(
                delete(data_key_wraps).where(data_key_wraps.c.object_id.in_(object_ids))
            )

    async def remove_owner(self, owner: str) -> int:
        """Delete every wrap under one owner's key; return how many there were."""
        async with begin(self.engine) as connection:
            result = await connection.execute(
                delete(data_key_wraps).where(data_key_wraps.c.owner == owner)
            )
            return int(result.rowcount)

    async def release(self, object_id: str, owner: str, digest: str) -> bool:
        """Delete the owner's wrap of a blob that none of its repositories uses.

        The last wrap of an object stays, so that the object remains readable
        until garbage collection removes it, and shredding its last owner still
        makes it unreadable. Returns True when a wrap was deleted.
        """
        async with begin(self.engine) as connection:
            if owner in await _owners_of_digest(connection, digest):
                return False
            count = await connection.scalar(
                select(func.count())
                .select_from(data_key_wraps)
                .where(data_key_wraps.c.object_id == object_id)
            )
            if not count or count < 2:
                return False
            # NOTE: on PostgreSQL a link committed by another request between the
            # check above and this delete is not seen, so the wrap can go while
            # that link needs it. The linking request adds the wrap again after
            # its link (Registry._link_blob), which closes all but a tiny window.
            result = await connection.execute(
                delete(data_key_wraps).where(
                    data_key_wraps.c.object_id == object_id,
                    data_key_wraps.c.owner == owner,
                )
            )
            return result.rowcount > 0

    async def count_sole(self, owner: str) -> int:
        """Count the objects whose only wrap is under `owner`'s key."""
        alone = (
            select(data_key_wraps.c.object_id)
            .group_by(data_key_wraps.c.object_id)
            .having(func.count() == 1)
            .subquery()
        )
        async with connect(self.engine) as connection:
            count = await connection.scalar(
                select(func.count())
                .select_from(data_key_wraps)
                .join(alone, alone.c.object_id == data_key_wraps.c.object_id)
                .where(data_key_wraps.c.owner == owner)
            )
        return int(count or 0)

    async def count_by_owner(self) -> Counter[str]:
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(data_key_wraps.c.owner, func.count()).group_by(
                    data_key_wraps.c.owner
                )
            )
            return Counter({row[0]: int(row[1]) for row in result})

    # Owners

    async def owner_of_repository(self, repository: str) -> str:
        async with connect(self.engine) as connection:
            return await _owner_of_namespace(connection, namespace_of(repository))

    async def owner_of_upload(self, upload_id: str) -> str | None:
        """Return the owner of the repository an upload goes to, or None."""
        async with connect(self.engine) as connection:
            repository = await connection.scalar(
                select(repositories.c.name)
                .join(uploads, uploads.c.repository_id == repositories.c.id)
                .where(uploads.c.id == upload_id)
            )
            if repository is None:
                return None
            return await _owner_of_namespace(connection, namespace_of(repository))

    async def owners_of_digest(self, digest: str) -> set[str]:
        """Return the owners of every repository that links or references a blob."""
        async with connect(self.engine) as connection:
            return await _owners_of_digest(connection, digest)


async def _owner_of_namespace(connection: AsyncConnection, namespace: str) -> str:
    slug = await connection.scalar(
        select(customers.c.slug)
        .join(namespaces, namespaces.c.customer_id == customers.c.id)
        .where(namespaces.c.name == namespace)
    )
    return VENDOR_OWNER if slug is None else customer_owner(slug)


async def _owners_of_digest(connection: AsyncConnection, digest: str) -> set[str]:
    linked = (
        select(repositories.c.namespace)
        .join(repository_blobs, repository_blobs.c.repository_id == repositories.c.id)
        .where(repository_blobs.c.digest == digest)
    )
    referenced = (
        select(repositories.c.namespace)
        .join(manifests, manifests.c.repository_id == repositories.c.id)
        .join(manifest_references, manifest_references.c.manifest_id == manifests.c.id)
        .where(
            manifest_references.c.digest == digest,
            manifest_references.c.kind == "blob",
        )
    )
    used = union(linked, referenced).subquery()
    result = await connection.execute(
        select(used.c.namespace, customers.c.slug)
        .select_from(used)
        .outerjoin(namespaces, namespaces.c.name == used.c.namespace)
        .outerjoin(customers, customers.c.id == namespaces.c.customer_id)
    )
    return {
        VENDOR_OWNER if row.slug is None else customer_owner(row.slug) for row in result
    }
