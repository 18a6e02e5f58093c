"""The benchmark's bulk load stores what pushes through the API would store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from bench.dataload import copy_repository
from sqlalchemy import select

from moorage.db.schema import (
    manifest_references,
    manifests,
    repositories,
    repository_blobs,
    tags,
)
from moorage.services import Services
from tests.support.oci_client import pull_image, push_image, small_image
from tests.support.server import running_server

TAGS = ["v0", "v1", "v2"]


async def repository_rows(services: Services, name: str) -> dict[str, Any]:
    """Read everything stored for one repository, without ids and timestamps."""
    async with services.engine.connect() as connection:
        repository = (
            await connection.execute(
                select(repositories).where(repositories.c.name == name)
            )
        ).one()
        links = await connection.execute(
            select(repository_blobs.c.digest).where(
                repository_blobs.c.repository_id == repository.id
            )
        )
        stored = await connection.execute(
            select(manifests).where(manifests.c.repository_id == repository.id)
        )
        manifest_rows = [row._mapping for row in stored]
        digest_of = {row["id"]: row["digest"] for row in manifest_rows}
        references = await connection.execute(
            select(manifest_references).where(
                manifest_references.c.manifest_id.in_(list(digest_of))
            )
        )
        tagged = await connection.execute(
            select(tags.c.name, tags.c.manifest_id).where(
                tags.c.repository_id == repository.id
            )
        )
        tag_rows = sorted((row.name, digest_of[row.manifest_id]) for row in tagged)
    ignored = {"id", "repository_id", "created_at", "content"}
    contents = []
    for row in manifest_rows:
        # Sealed content differs per push (random nonces): compare it opened.
        record = await services.registry.store.get_manifest(name, row["digest"])
        assert record is not None
        contents.append(record.content)
    return {
        "namespace": repository.namespace,
        "blob_links": sorted(row.digest for row in links),
        "manifests": sorted(
            sorted((k, v) for k, v in row.items() if k not in ignored)
            for row in manifest_rows
        ),
        "contents": sorted(contents),
        "references": sorted(
            (digest_of[row.manifest_id], row.digest, row.kind) for row in references
        ),
        "tags": tag_rows,
    }


def test_copied_repository_matches_pushed_one(tmp_path: Path) -> None:
    """Copies of a seed repository equal a repository pushed through the API."""
    with running_server(tmp_path / "data") as server:
        customer = server.add_customer()
        login, password = server.add_user(customer, "writer")
        image = small_image()
        copies = [f"{customer}/copied-{index}" for index in range(3)]
        with httpx.Client(
            base_url=server.url, auth=(login, password), verify=server.verify
        ) as client:
            push_image(client, f"{customer}/seed", "seed", image)
            for tag in TAGS:
                push_image(client, f"{customer}/pushed", tag, image)

            server.run_admin(
                lambda s: copy_repository(
                    s.engine, f"{customer}/seed", "seed", copies, TAGS
                )
            )

            pushed = server.run_admin(
                lambda s: repository_rows(s, f"{customer}/pushed")
            )
            for name in copies:
                copied = server.run_admin(lambda s, n=name: repository_rows(s, n))
                assert copied == pushed, name
            listed = client.get(f"/v2/{customer}/copied-1/tags/list")
            assert listed.status_code == 200, listed.text
            assert listed.json()["tags"] == TAGS
            assert pull_image(client, f"{customer}/copied-2", "v2") > 0
