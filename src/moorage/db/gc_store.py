"""Queries of garbage collection: unreferenced blobs, links and manifests.

Every delete runs in a transaction that first locks what it deletes and then
checks again, in statements of its own, that nothing references it: on
PostgreSQL a FOR UPDATE lock on the blob's (or manifest's) row, which a push
that names it holds FOR KEY SHARE (see `registry_store.hold_blobs`); on
SQLite the database's write lock. Under PostgreSQL's READ COMMITTED each
statement after the lock sees what a push that went first committed. A push
that comes second waits for the lock and then finds the row gone, so its
manifest is rejected with MANIFEST_BLOB_UNKNOWN, or its upload stores the
blob again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from moorage.db.dialects import insert_ignore
from moorage.db.schema import (
    blobs,
    customers,
    maintenance_leases,
    manifest_references,
    manifests,
    object_paths,
    repositories,
    repository_blobs,
    tags,
    utcnow,
)
from moorage.db.transactions import begin, connect


@dataclass(frozen=True, slots=True)
class BlobRow:
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class LinkRow:
    repository_id: int
    repository: str
    digest: str


@dataclass(frozen=True, slots=True)
class ManifestRow:
    id: int
    repository_id: int
    repository: str
    digest: str
    subject_digest: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ManifestGraph:
    """Every manifest with what decides whether `--delete-untagged` keeps it."""

    manifests: list[ManifestRow]
    tagged: set[int]
    # (manifest id, digest of a child manifest it names)
    children: list[tuple[int, str]]


@dataclass(frozen=True, slots=True)
class DueDeletion:
    customer_id: int
    slug: str
    delete_after: datetime


@dataclass(frozen=True, slots=True)
class Moved:
    """Where garbage collection moved a blob's file: from `source` to
    `destination`, or nowhere ("") when there was no file."""

    source: str
    destination: str


# Called with a blob's digest inside the transaction that deletes its row:
# moves the file away, or returns None when the row must stay because a new
# copy was put in place meanwhile.
ClaimFile = Callable[[str], Awaitable[Moved | None]]


def _unreferenced(digest: Any) -> Any:
    """No repository links the blob and no manifest references it."""
    return and_(
        ~exists().where(repository_blobs.c.digest == digest),
        ~exists().where(
            manifest_references.c.digest == digest,
            manifest_references.c.kind == "blob",
        ),
    )


def _released_before(cutoff: Any) -> Any:
    """The blob lost its last reference (or was stored) before `cutoff`."""
    return func.coalesce(blobs.c.released_at, blobs.c.created_at) < cutoff


_CUTOFF = bindparam("cutoff", type_=blobs.c.created_at.type)


class GcStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Awaited inside each delete transaction right after its locks, with
        # "links" or "blobs", so that tests can run a push at that point.
        self.after_lock: Callable[[str], Awaitable[None]] | None = None

    # Blobs

    async def unreferenced_blobs(
        self, cutoff: datetime, after: str, limit: int
    ) -> list[BlobRow]:
        """Return up to `limit` blobs after digest `after` that nothing
        references and that were released before `cutoff`."""
        query = (
            select(blobs.c.digest, blobs.c.size)
            .where(
                blobs.c.digest > after,
                _unreferenced(blobs.c.digest),
                _released_before(_CUTOFF),
            )
            .order_by(blobs.c.digest)
            .limit(limit)
        )
        async with connect(self.engine) as connection:
            result = await connection.execute(query, {"cutoff": cutoff})
            return [BlobRow(row.digest, int(row.size)) for row in result]

    async def waiting_blobs(self, cutoff: datetime) -> tuple[int, int]:
        """Count the unreferenced blobs still in their grace period, and their bytes."""
        query = select(func.count(), func.coalesce(func.sum(blobs.c.size), 0)).where(
            _unreferenced(blobs.c.digest), ~_released_before(_CUTOFF)
        )
        async with connect(self.engine) as connection:
            count, total = (await connection.execute(query, {"cutoff": cutoff})).one()
        return int(count), int(total)

    async def delete_blobs(
        self, candidates: Sequence[BlobRow], cutoff: datetime, claim: ClaimFile
    ) -> list[tuple[BlobRow, Moved]]:
        """Delete the rows of those `candidates` that are still unreferenced and
        released before `cutoff`, in one transaction, after `claim` moved each
        one's file away; return them with where each file went.

        When the transaction fails, ClaimedError lists the files moved, for the
        caller to move back.
        """
        digests = sorted(row.digest for row in candidates)
        claimed: list[tuple[BlobRow, Moved]] = []
        try:
            async with begin(self.engine) as connection:
                await _lock_blobs(connection, digests)
                if self.after_lock is not None:
                    await self.after_lock("blobs")
                result = await connection.execute(
                    select(blobs.c.digest, blobs.c.size)
                    .where(
                        blobs.c.digest.in_(digests),
                        _unreferenced(blobs.c.digest),
                        _released_before(_CUTOFF),
                    )
                    .order_by(blobs.c.digest),
                    {"cutoff": cutoff},
                )
                eligible = [BlobRow(row.digest, int(row.size)) for row in result]
                for row in eligible:
                    moved = await claim(row.digest)
                    if moved is not None:
                        claimed.append((row, moved))
                gone = [row.digest for row, _ in claimed]
                if gone:
                    await connection.execute(
                        delete(blobs).where(blobs.c.digest.in_(gone))
                    )
                for _, moved in claimed:
                    if moved.destination:
                        # The encrypting driver opens an object only at its
                        # recorded path, and forgets the wraps of the objects
                        # recorded where it deletes.
                        await connection.execute(
                            update(object_paths)
                            .where(object_paths.c.path == moved.source)
                            .values(path=moved.destination)
                        )
        except BaseException as error:
            if any(moved.destination for _, moved in claimed):
                raise ClaimedError(claimed) from error
            raise
        return claimed

    # Links

    async def unreferenced_links(
        self, cutoff: datetime, limit: int, after: tuple[str, int] = ("", 0)
    ) -> list[LinkRow]:
        """Return up to `limit` links after (digest, repository id) `after`,
        older than `cutoff`, to blobs that no manifest of the linking
        repository references and that were not released since `cutoff`."""
        in_repository = (
            select(manifest_references.c.digest)
            .join(manifests, manifests.c.id == manifest_references.c.manifest_id)
            .where(
                manifests.c.repository_id == repository_blobs.c.repository_id,
                manifest_references.c.digest == repository_blobs.c.digest,
                manifest_references.c.kind == "blob",
            )
            .exists()
        )
        query = (
            select(
                repository_blobs.c.repository_id,
                repositories.c.name,
                repository_blobs.c.digest,
            )
            .join(repositories, repositories.c.id == repository_blobs.c.repository_id)
            .join(blobs, blobs.c.digest == repository_blobs.c.digest)
            .where(
                tuple_(repository_blobs.c.digest, repository_blobs.c.repository_id)
                > tuple_(literal(after[0]), literal(after[1])),
                repository_blobs.c.created_at < _CUTOFF,
                or_(blobs.c.released_at.is_(None), blobs.c.released_at < _CUTOFF),
                ~in_repository,
            )
            .order_by(repository_blobs.c.digest, repository_blobs.c.repository_id)
            .limit(limit)
        )
        async with connect(self.engine) as connection:
            result = await connection.execute(query, {"cutoff": cutoff})
            return [LinkRow(*row) for row in result]

    async def delete_links(
        self, candidates: Sequence[LinkRow], cutoff: datetime
    ) -> list[LinkRow]:
        """Delete those `candidates` that are still unreferenced in their
        repository and older than `cutoff`; return them."""
        deleted: list[LinkRow] = []
        async with begin(self.engine) as connection:
            await _lock_blobs(connection, sorted({row.digest for row in candidates}))
            if self.after_lock is not None:
                await self.after_lock("links")
            for row in candidates:
                in_repository = (
                    select(manifest_references.c.digest)
                    .join(
                        manifests, manifests.c.id == manifest_references.c.manifest_id
                    )
                    .where(
                        manifests.c.repository_id == row.repository_id,
                        manifest_references.c.digest == row.digest,
                        manifest_references.c.kind == "blob",
                    )
                    .exists()
                )
                result = await connection.execute(
                    delete(repository_blobs).where(
                        repository_blobs.c.repository_id == row.repository_id,
                        repository_blobs.c.digest == row.digest,
                        repository_blobs.c.created_at < _CUTOFF,
                        ~in_repository,
                    ),
                    {"cutoff": cutoff},
                )
                if result.rowcount:
                    deleted.append(row)
            if deleted:
                await connection.execute(
                    update(blobs)
                    .where(blobs.c.digest.in_({row.digest for row in deleted}))
                    .values(released_at=utcnow())
                )
        return deleted

    # Manifests

    async def manifest_graph(self) -> ManifestGraph:
        """Read every manifest, which ones a tag names, and which children
        each index names."""
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(
                    manifests.c.id,
                    manifests.c.repository_id,
                    repositories.c.name,
                    manifests.c.digest,
                    manifests.c.subject_digest,
                    manifests.c.created_at,
                )
                .join(repositories, repositories.c.id == manifests.c.repository_id)
                .order_by(manifests.c.id)
            )
            rows = [ManifestRow(*row) for row in result]
            tagged = set(await connection.scalars(select(tags.c.manifest_id)))
            result = await connection.execute(
                select(
                    manifest_references.c.manifest_id, manifest_references.c.digest
                ).where(manifest_references.c.kind == "manifest")
            )
            children = [(int(row[0]), str(row[1])) for row in result]
        return ManifestGraph(rows, tagged, children)

    async def delete_untagged_manifest(
        self, candidate: ManifestRow, cutoff: datetime
    ) -> bool:
        """Delete a manifest if it is still older than `cutoff`, untagged, named
        by no other manifest of its repository, and either not a referrer or
        one whose subject is gone from the repository. Its blobs are released."""
        async with begin(self.engine) as connection:
            if connection.dialect.name == "postgresql":
                await connection.execute(
                    select(manifests.c.id)
                    .where(manifests.c.id == candidate.id)
                    .with_for_update()
                )
            else:
                await connection.execute(_TAKE_WRITE_LOCK)
            row = (
                await connection.execute(
                    select(manifests.c.subject_digest).where(
                        manifests.c.id == candidate.id,
                        manifests.c.created_at < _CUTOFF,
                        ~exists().where(tags.c.manifest_id == candidate.id),
                    ),
                    {"cutoff": cutoff},
                )
            ).first()
            if row is None:
                return False
            named = await connection.scalar(
                select(manifest_references.c.manifest_id)
                .join(manifests, manifests.c.id == manifest_references.c.manifest_id)
                .where(
                    manifests.c.repository_id == candidate.repository_id,
                    manifests.c.id != candidate.id,
                    manifest_references.c.digest == candidate.digest,
                    manifest_references.c.kind == "manifest",
                )
                .limit(1)
            )
            if named is not None:
                return False
            if row.subject_digest is not None:
                subject = await connection.scalar(
                    select(manifests.c.id).where(
                        manifests.c.repository_id == candidate.repository_id,
                        manifests.c.digest == row.subject_digest,
                    )
                )
                if subject is not None:
                    return False
            await connection.execute(
                update(blobs)
                .where(
                    blobs.c.digest.in_(
                        select(manifest_references.c.digest).where(
                            manifest_references.c.manifest_id == candidate.id,
                            manifest_references.c.kind == "blob",
                        )
                    )
                )
                .values(released_at=utcnow())
            )
            await connection.execute(
                delete(manifest_references).where(
                    manifest_references.c.manifest_id == candidate.id
                )
            )
            await connection.execute(
                delete(manifests).where(manifests.c.id == candidate.id)
            )
        return True

    # Scheduled deletions (`customer offboard --delete-after`)

    async def due_deletions(self, now: datetime) -> list[DueDeletion]:
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(customers.c.id, customers.c.slug, customers.c.delete_after)
                .where(customers.c.delete_after <= now)
                .order_by(customers.c.delete_after, customers.c.id)
            )
            return [DueDeletion(*row) for row in result]

    async def take_due_deletion(self, due: DueDeletion) -> bool:
        """Clear a due deletion unless another process took it first; join the
        open unit of work, so that the deletion and its event commit with it."""
        async with begin(self.engine) as connection:
            result = await connection.execute(
                update(customers)
                .where(
                    customers.c.id == due.customer_id,
                    customers.c.delete_after == due.delete_after,
                )
                .values(delete_after=None)
            )
            return bool(result.rowcount)

    # Leases

    async def take_lease(
        self, name: str, holder: str, until: datetime, now: datetime
    ) -> tuple[str, datetime] | None:
        """Take or renew the lease `name` for `holder` until `until`; return
        None, or the other holder and its expiry when the lease is held."""
        async with begin(self.engine) as connection:
            await insert_ignore(
                connection,
                maintenance_leases,
                {"name": name, "holder": holder, "expires_at": until},
            )
            result = await connection.execute(
                update(maintenance_leases)
                .where(
                    maintenance_leases.c.name == name,
                    or_(
                        maintenance_leases.c.holder == holder,
                        maintenance_leases.c.expires_at <= now,
                    ),
                )
                .values(holder=holder, expires_at=until)
            )
            if result.rowcount:
                return None
            row = (
                await connection.execute(
                    select(
                        maintenance_leases.c.holder, maintenance_leases.c.expires_at
                    ).where(maintenance_leases.c.name == name)
                )
            ).one()
            return str(row.holder), row.expires_at

    async def release_lease(self, name: str, holder: str) -> None:
        async with begin(self.engine) as connection:
            await connection.execute(
                delete(maintenance_leases).where(
                    maintenance_leases.c.name == name,
                    maintenance_leases.c.holder == holder,
                )
            )

    async def blob_row_exists(self, digest: str) -> bool:
        async with connect(self.engine) as connection:
            found = await connection.scalar(
                select(blobs.c.digest).where(blobs.c.digest == digest)
            )
        return found is not None


class ClaimedError(Exception):
    """The transaction that deletes blob rows failed after files were moved."""

    def __init__(self, claimed: list[tuple[BlobRow, Moved]]) -> None:
        super().__init__("deleting blob rows failed after their files were moved")
        self.claimed = claimed


async def _lock_blobs(connection: AsyncConnection, digests: Sequence[str]) -> None:
    """Lock blob rows FOR UPDATE in digest order (PostgreSQL), or take the
    write lock (SQLite), before the statements that check them."""
    if connection.dialect.name == "postgresql":
        if digests:
            await connection.execute(
                select(blobs.c.digest)
                .where(blobs.c.digest.in_(sorted(digests)))
                .order_by(blobs.c.digest)
                .with_for_update()
            )
        return
    await connection.execute(_TAKE_WRITE_LOCK)


_TAKE_WRITE_LOCK = update(blobs).where(false()).values(size=blobs.c.size)
