"""Load many repositories and tags into the registries for the data-scale phase.

Pushing 10,000 repositories and 100,000 tags through the API would take 15
minutes or more per registry on a 2-core machine (an estimate from the
small-image scenario's rate of about 150 requests/s), so the suite pushes one
seed image through the API into each registry and then copies what that push
stored, repository by repository:

- Moorage: the seed repository's rows (blob links, manifests, manifest
  references, tags) are inserted again for every new repository, in batches,
  straight into the database while the server is stopped. The blobs are shared,
  as pushes of the same content would share them. The new repositories belong
  to customers added through `moorage.admin`, as a vendor would add them.
- distribution: the seed repository's link files are written again under every
  new repository's directory; distribution reads them from the filesystem on
  each request.

`tests/bench/test_dataload.py` checks that the copied rows equal those of
the same image pushed through the API.

NOTE: pushes would also have added one audit event per blob and manifest
upload; the copy adds none, so the audit trail does not grow with the load.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from moorage import admin
from moorage.config import Settings
from moorage.db.schema import (
    manifest_references,
    manifests,
    repositories,
    repository_blobs,
    tags,
    utcnow,
)
from moorage.names import namespace_of
from moorage.services import open_services

SEED_REPOSITORY = "bench/scale-seed"
SEED_TAG = "seed"
# Repositories per database transaction while loading Moorage.
BATCH_REPOSITORIES = 500


@dataclass(frozen=True)
class Layout:
    """The data to load: `repositories` spread over `customers`, `tags` tags each."""

    repositories: int
    tags: int
    customers: int

    def customer_slugs(self) -> list[str]:
        return [f"scale-{index:03d}" for index in range(self.customers)]

    def repository_names(self) -> list[str]:
        slugs = self.customer_slugs()
        return [
            f"{slugs[index % self.customers]}/app-{index:05d}"
            for index in range(self.repositories)
        ]

    def tag_names(self) -> list[str]:
        return [f"v{index}" for index in range(self.tags)]


# Moorage


def load_moorage(settings: Settings, layout: Layout) -> float:
    """Copy the seed repository into `layout`'s repositories, and time it in seconds."""
    started = time.perf_counter()
    asyncio.run(_load_moorage(settings, layout))
    return time.perf_counter() - started


async def _load_moorage(settings: Settings, layout: Layout) -> None:
    services = await open_services(settings)
    try:
        for slug in layout.customer_slugs():
            await admin.add_customer(services.identity, slug, slug, None)
        await copy_repository(
            services.engine,
            SEED_REPOSITORY,
            SEED_TAG,
            layout.repository_names(),
            layout.tag_names(),
        )
    finally:
        await services.close()


async def copy_repository(
    engine: AsyncEngine,
    source: str,
    source_tag: str,
    targets: Sequence[str],
    target_tags: Sequence[str],
) -> None:
    """Store in each of `targets` what `source` holds, with `source_tag` as each tag.

    The targets must not exist yet. Every batch of repositories is one
    transaction.
    """
    async with engine.connect() as connection:
        seed = await _read_seed(connection, source, source_tag)
    for batch in _batches(targets, BATCH_REPOSITORIES):
        async with engine.begin() as connection:
            await _insert_copies(connection, seed, batch, target_tags)


@dataclass
class _Seed:
    blob_links: list[str]
    manifests: list[dict[str, Any]]
    # (manifest digest, referenced digest, kind)
    references: list[tuple[str, str, str]]
    tagged_digest: str


async def _read_seed(connection: AsyncConnection, source: str, tag: str) -> _Seed:
    repository_id = await connection.scalar(
        select(repositories.c.id).where(repositories.c.name == source)
    )
    if repository_id is None:
        raise LookupError(f"seed repository {source} not found; push it first")
    links = await connection.execute(
        select(repository_blobs.c.digest).where(
            repository_blobs.c.repository_id == repository_id
        )
    )
    rows = await connection.execute(
        select(manifests).where(manifests.c.repository_id == repository_id)
    )
    seed_manifests = [dict(row._mapping) for row in rows]
    digest_of = {row["id"]: row["digest"] for row in seed_manifests}
    references = await connection.execute(
        select(manifest_references).where(
            manifest_references.c.manifest_id.in_(list(digest_of))
        )
    )
    tagged = await connection.scalar(
        select(tags.c.manifest_id).where(
            tags.c.repository_id == repository_id, tags.c.name == tag
        )
    )
    if tagged is None:
        raise LookupError(f"seed tag {source}:{tag} not found; push it first")
    return _Seed(
        blob_links=[row.digest for row in links],
        manifests=seed_manifests,
        references=[
            (digest_of[row.manifest_id], row.digest, row.kind) for row in references
        ],
        tagged_digest=digest_of[tagged],
    )


async def _insert_copies(
    connection: AsyncConnection,
    seed: _Seed,
    names: Sequence[str],
    tag_names: Sequence[str],
) -> None:
    now = utcnow()
    await connection.execute(
        insert(repositories),
        [{"name": n, "namespace": namespace_of(n), "created_at": now} for n in names],
    )
    found = await connection.execute(
        select(repositories.c.id).where(repositories.c.name.in_(list(names)))
    )
    repository_ids = [row.id for row in found]
    await connection.execute(
        insert(repository_blobs),
        [
            {"repository_id": r, "digest": d, "created_at": now}
            for r in repository_ids
            for d in seed.blob_links
        ],
    )
    copied = [
        {**{k: v for k, v in row.items() if k != "id"}, "created_at": now}
        for row in seed.manifests
    ]
    await connection.execute(
        insert(manifests),
        [{**row, "repository_id": r} for r in repository_ids for row in copied],
    )
    rows = await connection.execute(
        select(manifests.c.id, manifests.c.repository_id, manifests.c.digest).where(
            manifests.c.repository_id.in_(repository_ids)
        )
    )
    manifest_ids = {(row.repository_id, row.digest): row.id for row in rows}
    if seed.references:
        await connection.execute(
            insert(manifest_references),
            [
                {"manifest_id": manifest_ids[(r, owner)], "digest": d, "kind": kind}
                for r in repository_ids
                for owner, d, kind in seed.references
            ],
        )
    await connection.execute(
        insert(tags),
        [
            {
                "repository_id": r,
                "name": tag,
                "manifest_id": manifest_ids[(r, seed.tagged_digest)],
                "updated_at": now,
            }
            for r in repository_ids
            for tag in tag_names
        ],
    )


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# distribution


def load_distribution(storage: Path, layout: Layout) -> float:
    """Copy the seed repository's link files into `layout`'s repositories, timed."""
    started = time.perf_counter()
    root = storage / "docker" / "registry" / "v2" / "repositories"
    seed = root / SEED_REPOSITORY
    if not seed.is_dir():
        raise LookupError(f"seed repository {seed} not found; push it first")
    tag_prefix = ("_manifests", "tags", SEED_TAG)
    files: list[tuple[tuple[str, ...], bytes]] = []
    for path in seed.rglob("*"):
        parts = path.relative_to(seed).parts
        # Upload sessions are per push, not part of the stored repository.
        if path.is_file() and parts[0] != "_uploads":
            files.append((parts, path.read_bytes()))
    for name in layout.repository_names():
        for parts, content in files:
            if parts[:3] == tag_prefix:
                for tag in layout.tag_names():
                    _write(
                        root / name, ("_manifests", "tags", tag, *parts[3:]), content
                    )
            else:
                _write(root / name, parts, content)
    return time.perf_counter() - started


def _write(base: Path, parts: tuple[str, ...], content: bytes) -> None:
    path = base.joinpath(*parts)
    os.makedirs(path.parent, exist_ok=True)
    path.write_bytes(content)
