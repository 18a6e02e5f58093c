"""Wrapped data keys of stored objects, one per owner (the `data_key_wraps` table).

An owner is the customer whose namespace holds a repository, named
`customer:<slug>`, or the vendor (`vendor`) for every other namespace. The
owner name is also the name of that owner's key-encryption key in `sealed_keys`.

Shredding deletes an owner's key and its wraps, and records every object whose
last wrap went with them in `shredded_objects`, all in one transaction, so an
object without wraps is known to be shredded or else damaged. The same table
records the id of the destroyed owner key itself, for manifests, whose data
keys are wrapped in their own rows (see `moorage.storage.encryption.manifests`).

Concurrent changes to one object's wraps are serialised (see `_lock_object`).
A release of an owner's wrap cannot interleave with the check that a new link
of the same blob has its owner's wrap. On PostgreSQL, row locks also keep a
shredding that deletes another wrap of the object from interleaving with them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    bindparam,
    delete,
    false,
    func,
    insert,
    select,
    text,
    union,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from moorage.db.dialects import insert_ignore, insert_ignore_statement
from moorage.db.schema import (
    blobs,
    customers,
    data_key_wraps,
    manifest_references,
    manifests,
    namespaces,
    object_paths,
    repositories,
    repository_blobs,
    sealed_keys,
    shredded_objects,
    uploads,
    utcnow,
)
from moorage.db.transactions import begin, connect
from moorage.names import namespace_of

VENDOR_OWNER = "vendor"
CUSTOMER_OWNER_PREFIX = "customer:"
# Advisory lock keys on PostgreSQL: (class, key) pairs, a key space apart from
# the single 64-bit keys that migrations lock. The classes are "wrap" and
# "shrd" in ASCII.
_WRAP_LOCK_CLASS = 0x77726170
_SHRED_LOCK_CLASS = 0x73687264
# Object ids per statement when shredding, well below the bound parameters
# that SQLite and asyncpg accept in one statement.
_SHRED_BATCH = 500
# Times `WrapStore.add_missing` makes wraps before the transaction and finds
# that the object's owners changed meanwhile, before it stops retrying.
_ADD_ATTEMPTS = 3


# Built once: building this statement on each blob read cost about as much
# client CPU as running it (an estimate from timing both forms in one process).
_WRAPS_AND_PATH = (
    select(
        data_key_wraps.c.owner,
        data_key_wraps.c.wrapped,
        select(object_paths.c.path)
        .where(object_paths.c.object_id == bindparam("object_id"))
        .scalar_subquery()
        .label("path"),
    )
    .where(data_key_wraps.c.object_id == bindparam("object_id"))
    .order_by(data_key_wraps.c.owner)
)


def customer_owner(slug: str) -> str:
    return CUSTOMER_OWNER_PREFIX + slug


@dataclass(frozen=True, slots=True)
class DataKeyWrap:
    owner: str
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class ShredCounts:
    key_destroyed: bool
    wraps_deleted: int
    # Objects whose only wrap was the owner's: no key opens them any more.
    objects_unreadable: int
    # Blobs among those objects, now marked shredded in the `blobs` table.
    blobs_unreadable: int
    # Manifests of the owner's repositories, sealed under the destroyed key.
    manifests_unreadable: int = 0


@dataclass(frozen=True, slots=True)
class ObjectPlace:
    """The recorded path of an object, and whether other objects are recorded
    at the path where it was found."""

    # The path recorded for the object, or None when it has none.
    path: str | None
    # Whether the path it was found at has other objects recorded.
    path_has_others: bool


class WrapStore:
    """Queries for wrapped data keys, the paths of objects, and the owners of
    repositories and blobs."""

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

    async def wraps_and_path(
        self, object_id: str
    ) -> tuple[list[DataKeyWrap], str | None]:
        """Return the object's wraps, and the path recorded for it when it has
        wraps, in one query (each blob read runs it)."""
        async with connect(self.engine) as connection:
            result = await connection.execute(_WRAPS_AND_PATH, {"object_id": object_id})
            rows = result.all()
        wraps = [DataKeyWrap(row.owner, bytes(row.wrapped)) for row in rows]
        return wraps, rows[0].path if rows else None

    async def place(self, object_id: str, path: str) -> ObjectPlace:
        """Return the path recorded for the object, and whether `path` has
        other objects recorded."""
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(object_paths.c.object_id, object_paths.c.path).where(
                    (object_paths.c.object_id == object_id)
                    | (object_paths.c.path == path)
                )
            )
            rows = result.all()
        recorded = next((row.path for row in rows if row.object_id == object_id), None)
        has_others = any(row.object_id != object_id for row in rows)
        return ObjectPlace(recorded, has_others)

    async def add(
        self, object_id: str, wraps: list[DataKeyWrap], path: str | None = None
    ) -> None:
        """Store wraps, and the object's path when given, in one transaction.

        An owner that already has a wrap for the object keeps it.
        """
        async with begin(self.engine) as connection:
            await _insert_wraps(connection, object_id, wraps)
            if path is not None:
                await _record_path(connection, object_id, path)

    async def record_path(self, object_id: str, path: str) -> None:
        """Record the path at which a new object is stored."""
        async with begin(self.engine) as connection:
            await _record_path(connection, object_id, path)

    async def record_missing_paths(self, found: Mapping[str, str]) -> int:
        """Record objects found at paths (path to object id) that have no
        recorded path yet; an object recorded elsewhere keeps its path.
        Return how many were recorded."""
        recorded = 0
        async with begin(self.engine) as connection:
            for path, object_id in found.items():
                result = await connection.execute(
                    insert_ignore_statement(
                        connection.dialect,
                        object_paths,
                        {"object_id": object_id, "path": path},
                    )
                )
                recorded += result.rowcount
        return recorded

    async def paths_recorded(self, paths: Sequence[str]) -> set[str]:
        """Return those of `paths` at which some object is recorded."""
        found: set[str] = set()
        async with connect(self.engine) as connection:
            for batch in _batches(paths):
                found.update(
                    await connection.scalars(
                        select(object_paths.c.path)
                        .where(object_paths.c.path.in_(batch))
                        .distinct()
                    )
                )
        return found

    async def move_path(self, source: str, destination: str) -> None:
        """Record the objects recorded at `source` at `destination` instead."""
        async with begin(self.engine) as connection:
            await connection.execute(
                update(object_paths)
                .where(object_paths.c.path == source)
                .values(path=destination)
            )

    async def objects_to_forget(
        self, paths: Sequence[str], found: Sequence[str]
    ) -> list[str]:
        """Return the objects that deleting `paths` removes.

        `found` contains the object ids read from the files at `paths`. Those
        are the objects recorded at `paths`, and those of `found` that have no
        recorded path. An object of `found` recorded at another path is a copy
        of that object, whose wraps must stay.
        """
        requested = set(paths)
        recorded: dict[str, str] = {}
        async with connect(self.engine) as connection:
            for batch in _batches(paths):
                result = await connection.execute(
                    select(object_paths.c.object_id, object_paths.c.path).where(
                        object_paths.c.path.in_(batch)
                    )
                )
                recorded.update({row.object_id: row.path for row in result})
            for batch in _batches(found):
                result = await connection.execute(
                    select(object_paths.c.object_id, object_paths.c.path).where(
                        object_paths.c.object_id.in_(batch)
                    )
                )
                recorded.update({row.object_id: row.path for row in result})
        forget = [i for i, path in recorded.items() if path in requested]
        forget += [i for i in dict.fromkeys(found) if i not in recorded]
        return forget

    async def add_missing(
        self,
        object_id: str,
        owner: str,
        new_wraps: Callable[[], Awaitable[list[DataKeyWrap]]],
    ) -> bool:
        """Store the wraps that `new_wraps` makes, unless `owner` has a wrap already.

        A request that links a blob calls this after its link commits.
        `new_wraps` reads the database, so it runs before this method's
        transaction, and a call holds one pooled connection at a time. The
        transaction stores the wraps only if the object's owners are still the
        ones seen before `new_wraps` ran; otherwise (a release, a shredding or
        another link in between) it starts again, so no wrap is made from a
        data key that a shredding has destroyed since. On PostgreSQL the check
        and the insert hold the object's lock, so a concurrent `release` of the
        owner's wrap either finds that link or is undone here. On SQLite
        `release` holds the database's write lock from its first statement, so
        the link commits before it or after it. Returns True when wraps were
        stored.
        """
        for _ in range(_ADD_ATTEMPTS):
            seen = {wrap.owner for wrap in await self.wraps(object_id)}
            # The owner's wrap may be going: only the locked check below counts.
            wraps = [] if owner in seen else await new_wraps()
            async with begin(self.engine) as connection:
                current = await _locked_owners(connection, object_id)
                if owner in current:
                    return False
                if current == seen:
                    await _insert_wraps(connection, object_id, wraps)
                    return True
        # NOTE: after this many changes to the object's owners in a row,
        # `new_wraps` runs inside the transaction, which then holds a second
        # pooled connection while it waits.
        async with begin(self.engine) as connection:
            if owner in await _locked_owners(connection, object_id):
                return False
            await _insert_wraps(connection, object_id, await new_wraps())
            return True

    async def remove_objects(self, object_ids: list[str]) -> None:
        """Forget deleted objects: their wraps and their shredding records."""
        if not object_ids:
            return
        async with begin(self.engine) as connection:
            await connection.execute(
                delete(data_key_wraps).where(data_key_wraps.c.object_id.in_(object_ids))
            )
            await connection.execute(
                delete(shredded_objects).where(
                    shredded_objects.c.object_id.in_(object_ids)
                )
            )
            await connection.execute(
                delete(object_paths).where(object_paths.c.object_id.in_(object_ids))
            )

    async def shred(
        self,
        owner: str,
        blob_objects: Mapping[str, str] | None = None,
        key_fingerprint: str | None = None,
    ) -> ShredCounts:
        """Destroy an owner's key and its wraps, and record what no key opens now.

        One transaction deletes the owner's sealed key, deletes every wrap under
        it, adds each object left without a wrap to `shredded_objects`, and
        sets `blobs.shredded_at` of those that `blob_objects` (object id to
        digest) names. `key_fingerprint`, the id of the key destroyed, goes
        into `shredded_objects` too, so that manifests sealed under it read as
        shredded rather than damaged.
        """
        async with begin(self.engine) as connection:
            if connection.dialect.name == "postgresql":
                # Two owners shredded at once would each see the other's wraps
                # of an object they share and record it as shredded by neither.
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:class, 0)"),
                    {"class": _SHRED_LOCK_CLASS},
                )
            destroyed = await connection.execute(
                delete(sealed_keys).where(sealed_keys.c.name == owner)
            )
            query = select(data_key_wraps.c.object_id).where(
                data_key_wraps.c.owner == owner
            )
            if connection.dialect.name == "postgresql":
                query = query.with_for_update()
            object_ids = list(await connection.scalars(query))
            await connection.execute(
                delete(data_key_wraps).where(data_key_wraps.c.owner == owner)
            )
            remaining: set[str] = set()
            for batch in _batches(object_ids):
                remaining.update(
                    await connection.scalars(
                        select(data_key_wraps.c.object_id)
                        .where(data_key_wraps.c.object_id.in_(batch))
                        .distinct()
                    )
                )
            unreadable = [i for i in object_ids if i not in remaining]
            now = utcnow()
            for batch in _batches(unreadable):
                await connection.execute(
                    delete(shredded_objects).where(
                        shredded_objects.c.object_id.in_(batch)
                    )
                )
                await connection.execute(
                    insert(shredded_objects),
                    [
                        {"object_id": i, "owner": owner, "shredded_at": now}
                        for i in batch
                    ],
                )
            objects = blob_objects or {}
            digests = [objects[i] for i in unreadable if i in objects]
            for batch in _batches(digests):
                await connection.execute(
                    update(blobs)
                    .where(blobs.c.digest.in_(batch))
                    .values(shredded_at=now)
                )
            manifest_count = 0
            if key_fingerprint is not None:
                await _record_destroyed_key(connection, key_fingerprint, owner)
                # Rows stored before annotations were kept for referrers only
                # have a plaintext copy of them.
                await connection.execute(
                    update(manifests)
                    .where(
                        manifests.c.repository_id.in_(_repositories_of(owner)),
                        manifests.c.subject_digest.is_(None),
                        manifests.c.annotations.is_not(None),
                    )
                    .values(annotations=None)
                )
                counted = await connection.scalar(
                    select(func.count())
                    .select_from(manifests)
                    .where(manifests.c.repository_id.in_(_repositories_of(owner)))
                )
                manifest_count = int(counted or 0)
        return ShredCounts(
            destroyed.rowcount == 1,
            len(object_ids),
            len(unreadable),
            len(digests),
            manifest_count,
        )

    async def digests_used_by(self, owner: str) -> list[str]:
        """Return the blobs that the owner's repositories link or reference."""
        owned = _repositories_of(owner)
        linked = select(repository_blobs.c.digest).where(
            repository_blobs.c.repository_id.in_(owned)
        )
        referenced = (
            select(manifest_references.c.digest)
            .join(manifests, manifests.c.id == manifest_references.c.manifest_id)
            .where(
                manifests.c.repository_id.in_(owned),
                manifest_references.c.kind == "blob",
            )
        )
        async with connect(self.engine) as connection:
            return list(await connection.scalars(union(linked, referenced)))

    async def shredded(self, object_id: str) -> bool:
        """Return whether shredding deleted the object's last wrap."""
        async with connect(self.engine) as connection:
            found = await connection.scalar(
                select(shredded_objects.c.object_id).where(
                    shredded_objects.c.object_id == object_id
                )
            )
        return found is not None

    async def release(self, object_id: str, owner: str, digest: str) -> bool:
        """Delete the owner's wrap of a blob that none of its repositories uses.

        The last wrap of an object stays, so that the object remains readable
        until garbage collection removes it, and shredding its last owner still
        makes it unreadable. Returns True when a wrap was deleted.
        """
        async with begin(self.engine) as connection:
            await _lock_object(connection, object_id)
            if owner in await _owners_of_digest(connection, digest):
                return False
            query = select(data_key_wraps.c.owner).where(
                data_key_wraps.c.object_id == object_id
            )
            if connection.dialect.name == "postgresql":
                # A shredding that deleted another wrap and has not committed
                # is waited for, so the count is of the wraps that stay.
                query = query.with_for_update()
            if len(list(await connection.scalars(query))) < 2:
                return False
            result = await connection.execute(
                delete(data_key_wraps).where(
                    data_key_wraps.c.object_id == object_id,
                    data_key_wraps.c.owner == owner,
                )
            )
            return result.rowcount > 0

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


async def _locked_owners(connection: AsyncConnection, object_id: str) -> set[str]:
    """Return the owners of an object's wraps, and keep them until the
    transaction ends: on PostgreSQL the object's lock and a share lock on the
    rows, for which shredding waits."""
    query = select(data_key_wraps.c.owner).where(
        data_key_wraps.c.object_id == object_id
    )
    if connection.dialect.name == "postgresql":
        await _lock_object(connection, object_id)
        query = query.with_for_update(read=True)
    return set(await connection.scalars(query))


async def _record_destroyed_key(
    connection: AsyncConnection, key_fingerprint: str, owner: str
) -> None:
    await connection.execute(
        delete(shredded_objects).where(shredded_objects.c.object_id == key_fingerprint)
    )
    await connection.execute(
        insert(shredded_objects).values(
            object_id=key_fingerprint, owner=owner, shredded_at=utcnow()
        )
    )


async def _insert_wraps(
    connection: AsyncConnection, object_id: str, wraps: list[DataKeyWrap]
) -> None:
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


async def _record_path(connection: AsyncConnection, object_id: str, path: str) -> None:
    await insert_ignore(
        connection, object_paths, {"object_id": object_id, "path": path}
    )


async def _lock_object(connection: AsyncConnection, object_id: str) -> None:
    """Serialise changes to one object's wraps until the transaction ends.

    PostgreSQL takes an advisory lock per object id (objects whose ids share
    their first 32 bits share a lock, which only makes one wait for the other).
    SQLite has neither row nor advisory locks, so a write statement takes the
    database's write lock, for which every other writer waits. The statement
    changes no row.
    """
    if connection.dialect.name == "postgresql":
        key = int(object_id[:8], 16) - 2**31
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(:class, :key)"),
            {"class": _WRAP_LOCK_CLASS, "key": key},
        )
        return
    await connection.execute(
        update(data_key_wraps)
        .where(data_key_wraps.c.object_id == object_id, false())
        .values(owner=data_key_wraps.c.owner)
    )


def _repositories_of(owner: str) -> Any:
    """Return a SELECT of the ids of the owner's repositories."""
    if owner.startswith(CUSTOMER_OWNER_PREFIX):
        slug = owner.removeprefix(CUSTOMER_OWNER_PREFIX)
        return (
            select(repositories.c.id)
            .join(namespaces, namespaces.c.name == repositories.c.namespace)
            .join(customers, customers.c.id == namespaces.c.customer_id)
            .where(customers.c.slug == slug)
        )
    return (
        select(repositories.c.id)
        .outerjoin(namespaces, namespaces.c.name == repositories.c.namespace)
        .where(namespaces.c.customer_id.is_(None))
    )


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


def _batches(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _SHRED_BATCH):
        yield items[start : start + _SHRED_BATCH]
