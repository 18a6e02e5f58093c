"""Garbage collection: delete what no manifest references, after a grace period.

A run has three steps, each safe while the server runs:

1. With `delete_untagged`, manifests that no tag names, that no kept index
   names and that are not referrers of a kept manifest are deleted (as
   distribution's `garbage-collect --delete-untagged` does). Manifests younger
   than the grace period are kept, with what they name.
2. A repository's link to a blob that no manifest of that repository
   references is deleted once the link and the blob's last release are older
   than the grace period.
3. A blob that no repository links and no manifest references is deleted,
   row and file, once it has been so for the grace period
   (`blobs.released_at`, or `created_at` for a blob that never lost a
   reference).

Steps 1 and 2 release blobs (they set `released_at`), so with a grace period
the blobs they free go in a later run. Every delete re-checks in a transaction
of its own that nothing references what it deletes (see
`moorage.db.gc_store`).

The file side of step 3: the collector moves a blob's file to `garbage/`
inside the transaction that deletes the row, and deletes it after the commit.
An upload of the same digest links its blob in a transaction that waits for
that one, and looks for the file after its link commits, storing its own copy
when the file is gone (`Registry._commit`). A file that was put in place after
the grace period began is not taken at all (`StorageDriver.claim`). A run that
stops between the move and the commit leaves the file in `garbage/` with its
row; the next run moves it back.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from moorage.db.gc_store import (
    BlobRow,
    ClaimedError,
    GcStore,
    LinkRow,
    ManifestGraph,
    ManifestRow,
    Moved,
)
from moorage.db.schema import utcnow
from moorage.digests import parse_digest
from moorage.errors import ConflictError
from moorage.storage import paths
from moorage.storage.drivers.base import Claim
from moorage.storage.registry import Registry

log = structlog.get_logger(__name__)

# The lease that one process at a time holds while it collects.
LEASE = "gc"
# How long a lease lasts without renewal; a run renews it after every batch.
LEASE_SECONDS = 600
# Rows read per query, and blobs or links deleted per transaction. A blob
# transaction also moves that many files while it holds its locks.
PAGE = 500
BATCH = 100


@dataclass
class GcReport:
    """What a run deleted, or with `dry_run`, what it would delete."""

    dry_run: bool
    grace: timedelta
    manifests: int = 0
    links: int = 0
    blobs: int = 0
    # Bytes of the blobs deleted (their content, before encryption).
    bytes: int = 0
    # Unreferenced blobs whose grace period has not ended yet.
    waiting_blobs: int = 0
    waiting_bytes: int = 0
    # Files that an interrupted run had moved to garbage/ and that went back.
    restored: int = 0

    def describe(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        text = (
            f"{verb} {self.manifests} untagged manifests, {self.links} unused "
            f"blob links and {self.blobs} blobs ({self.bytes} bytes)"
        )
        if self.waiting_blobs:
            text += (
                f"; {self.waiting_blobs} unreferenced blobs "
                f"({self.waiting_bytes} bytes) are within the grace period of "
                f"{_hours(self.grace)} and go in a later run"
            )
        return text


class GcBusyError(ConflictError):
    """Another process holds the garbage collection lease."""


class GarbageCollector:
    def __init__(self, registry: Registry, store: GcStore, grace: timedelta) -> None:
        if grace < timedelta(0):
            raise ValueError("the grace period cannot be negative")
        self.registry = registry
        self.driver = registry.driver
        self.store = store
        self.grace = grace
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Called between transactions with the step name, for tests that
        # interleave a push with a run.
        self.pause: Callable[[str], Awaitable[None]] | None = None

    async def collect(
        self, *, dry_run: bool = False, delete_untagged: bool = False
    ) -> GcReport:
        """Run once; raise GcBusyError when another process is collecting."""
        now = utcnow()
        cutoff = now - self.grace
        report = GcReport(dry_run, self.grace)
        if dry_run:
            await self._count(report, cutoff, delete_untagged)
            return report
        await self._renew()
        try:
            report.restored = await self._recover()
            # Each step counts the grace period from its own start, so that
            # without one (grace 0) a step deletes what the steps before it
            # released in this run, and one run frees a deleted image.
            if delete_untagged:
                report.manifests = await self._delete_manifests(cutoff)
            report.links = await self._delete_links(self._cutoff())
            cutoff = self._cutoff()
            await self._delete_blobs(report, cutoff)
            report.waiting_blobs, report.waiting_bytes = await self.store.waiting_blobs(
                cutoff
            )
        finally:
            await self.store.release_lease(LEASE, self.holder)
        return report

    async def _renew(self) -> None:
        now = utcnow()
        held = await self.store.take_lease(
            LEASE, self.holder, now + timedelta(seconds=LEASE_SECONDS), now
        )
        if held is not None:
            holder, until = held
            raise GcBusyError(
                f"garbage collection is running in another process ({holder}) "
                f"until {until:%Y-%m-%d %H:%M:%S} UTC at the latest; try again later"
            )

    def _cutoff(self) -> datetime:
        return utcnow() - self.grace

    async def _step(self, name: str) -> None:
        if self.pause is not None:
            await self.pause(name)

    # Dry run

    async def _count(
        self, report: GcReport, cutoff: datetime, delete_untagged: bool
    ) -> None:
        if delete_untagged:
            graph = await self.store.manifest_graph()
            report.manifests = len(unreachable_manifests(graph, cutoff))
        after: tuple[str, int] = ("", 0)
        while links := await self.store.unreferenced_links(cutoff, PAGE, after):
            report.links += len(links)
            after = (links[-1].digest, links[-1].repository_id)
        digest = ""
        while blobs := await self.store.unreferenced_blobs(cutoff, digest, PAGE):
            report.blobs += len(blobs)
            report.bytes += sum(blob.size for blob in blobs)
            digest = blobs[-1].digest
        report.waiting_blobs, report.waiting_bytes = await self.store.waiting_blobs(
            cutoff
        )

    # Step 0: files an interrupted run left in garbage/

    async def _recover(self) -> int:
        """Move back the files of blobs whose rows stayed; delete the rest."""
        restored = 0
        for key in await self.driver.list(paths.GARBAGE_PREFIX):
            digest = paths.garbage_digest_of(key)
            if digest is None:
                continue
            target = paths.blob_path(parse_digest(digest))
            if await self.store.blob_row_exists(
                digest
            ) and not await self.driver.exists(target):
                await self.driver.move(key, target)
                restored += 1
                log.warning("blob file put back after an interrupted gc", digest=digest)
            else:
                await self.driver.delete(key)
        return restored

    # Step 1: untagged manifests

    async def _delete_manifests(self, cutoff: datetime) -> int:
        graph = await self.store.manifest_graph()
        deleted = 0
        for number, candidate in enumerate(unreachable_manifests(graph, cutoff), 1):
            await self._step("manifest")
            if await self.store.delete_untagged_manifest(candidate, cutoff):
                deleted += 1
            if number % BATCH == 0:
                await self._renew()
        return deleted

    # Step 2: links

    async def _delete_links(self, cutoff: datetime) -> int:
        deleted = 0
        after: tuple[str, int] = ("", 0)
        while links := await self.store.unreferenced_links(cutoff, PAGE, after):
            after = (links[-1].digest, links[-1].repository_id)
            for start in range(0, len(links), BATCH):
                await self._step("links")
                batch: list[LinkRow] = links[start : start + BATCH]
                removed = await self.store.delete_links(batch, cutoff)
                deleted += len(removed)
                for link in removed:
                    await self.registry.release_key(link.repository, link.digest)
            await self._renew()
        return deleted

    # Step 3: blobs

    async def _delete_blobs(self, report: GcReport, cutoff: datetime) -> None:
        placed_before = cutoff.timestamp()

        async def claim(digest: str) -> Moved | None:
            source = paths.blob_path(parse_digest(digest))
            garbage = paths.garbage_path(parse_digest(digest), uuid.uuid4().hex)
            result = await self.driver.claim(source, garbage, placed_before)
            if result is Claim.RECENT:
                log.info("blob file put in place recently; kept", digest=digest)
                return None
            if result is Claim.MISSING:
                return Moved(source, "")
            return Moved(source, garbage)

        after = ""
        while blobs := await self.store.unreferenced_blobs(cutoff, after, PAGE):
            after = blobs[-1].digest
            for start in range(0, len(blobs), BATCH):
                await self._step("blobs")
                batch: list[BlobRow] = blobs[start : start + BATCH]
                try:
                    deleted = await self.store.delete_blobs(batch, cutoff, claim)
                except ClaimedError as error:
                    await self._put_back(error.claimed)
                    # With the files back, what failed is the cause (a
                    # database error, or Ctrl-C as KeyboardInterrupt).
                    if error.__cause__ is None:
                        raise
                    raise error.__cause__ from None
                for row, moved in deleted:
                    if moved.destination:
                        await self.driver.delete(moved.destination)
                    report.blobs += 1
                    report.bytes += row.size
            await self._renew()

    async def _put_back(self, claimed: list[tuple[BlobRow, Moved]]) -> None:
        """Move back the files of a blob transaction that failed."""
        for _, moved in claimed:
            if moved.destination:
                await self.driver.move(moved.destination, moved.source)


def unreachable_manifests(graph: ManifestGraph, cutoff: datetime) -> list[ManifestRow]:
    """Return the manifests that `--delete-untagged` deletes, each after the
    indexes and subjects that name it.

    Kept are: tagged manifests, manifests created after `cutoff`, the
    children of kept indexes and the referrers of kept manifests, in the
    same repository.
    """
    by_key = {(row.repository_id, row.digest): row for row in graph.manifests}
    rows_by_id = {row.id: row for row in graph.manifests}
    named: dict[int, list[ManifestRow]] = {}
    for parent_id, digest in graph.children:
        parent_row = rows_by_id.get(parent_id)
        if parent_row is None:
            continue
        child = by_key.get((parent_row.repository_id, digest))
        if child is not None:
            named.setdefault(parent_id, []).append(child)
    referrers: dict[tuple[int, str], list[ManifestRow]] = {}
    for row in graph.manifests:
        if row.subject_digest is not None:
            referrers.setdefault((row.repository_id, row.subject_digest), []).append(
                row
            )
    kept: set[int] = set()
    pending = [
        row
        for row in graph.manifests
        if row.id in graph.tagged or row.created_at >= cutoff
    ]
    while pending:
        row = pending.pop()
        if row.id in kept:
            continue
        kept.add(row.id)
        pending.extend(named.get(row.id, []))
        pending.extend(referrers.get((row.repository_id, row.digest), []))
    doomed = [row for row in graph.manifests if row.id not in kept]
    # Parents (indexes and subjects) before what they name, so that each
    # re-check finds its parents gone already.
    parents: dict[int, set[int]] = {row.id: set() for row in doomed}
    for parent_id, items in named.items():
        for child in items:
            if child.id in parents and parent_id in parents:
                parents[child.id].add(parent_id)
    for row in doomed:
        if row.subject_digest is None:
            continue
        subject = by_key.get((row.repository_id, row.subject_digest))
        if subject is not None and subject.id in parents:
            parents[row.id].add(subject.id)
    ordered: list[ManifestRow] = []
    done: set[int] = set()
    remaining = {row.id: row for row in doomed}
    while remaining:
        ready = [row for row in remaining.values() if parents[row.id] <= done] or list(
            remaining.values()
        )
        for row in ready:
            ordered.append(row)
            done.add(row.id)
            del remaining[row.id]
    return ordered


def _hours(grace: timedelta) -> str:
    hours = grace.total_seconds() / 3600
    return f"{hours:g} hours"
