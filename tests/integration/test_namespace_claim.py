"""Data pushed for the vendor into a namespace that a customer gets.

`customer add` rejects a namespace that already contains repositories, but a
push can look up the owner of its repository just before the customer is
created and seal for the vendor. These tests build that state on purpose: a
manifest sealed for the vendor and a blob wrapped for the vendor alone, in the
customer's namespace. They check that it moves to the customer's key through
`claim_namespace` (which `customer add` runs), through the server's reseal at
start-up, and before `customer shred` destroys the key. A copy of the
database and storage taken after the shredding then reads none of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete

from moorage.db.schema import data_key_wraps
from moorage.db.wrap_store import VENDOR_OWNER, customer_owner
from moorage.digests import parse_digest
from moorage.services import Services
from moorage.storage import paths
from moorage.storage.encryption import custody, maintenance
from moorage.storage.encryption.custody import DataKeyUnavailableError
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.manifests import ManifestCipher, parse_sealed
from tests.integration.test_encryption_at_rest import push_manifest, stored_manifest
from tests.support.database import copy_database, drop_database
from tests.support.images import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST
from tests.support.receivers import wait_until
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique


def moorage(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return server.run_command(*args)


def vendor_client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD), timeout=60
    )


def config_digest(manifest: bytes) -> str:
    digest: str = json.loads(manifest)["config"]["digest"]
    return digest


def sealed_owner(server: ServerProcess, repository: str) -> str | None:
    sealed = parse_sealed(stored_manifest(server, repository))
    return None if sealed is None else sealed.owner


def blob_wrap_owners(server: ServerProcess, digest: str) -> set[str]:
    async def owners(services: Services) -> set[str]:
        driver = encrypted_driver(services)
        header = await driver.read_header(paths.blob_path(parse_digest(digest)))
        assert header is not None
        assert driver.custody is not None
        return set(await driver.custody.owners(header.object_id))

    return server.run_admin(owners)


def encrypted_driver(services: Services) -> EncryptedDriver:
    driver = services.registry.driver
    assert isinstance(driver, EncryptedDriver)
    assert driver.custody is not None
    return driver


async def seal_for_vendor(
    services: Services, namespace: str, blob_digest: str, customer: str
) -> None:
    """Store what a push racing `customer add` stores: the namespace's manifests
    sealed for the vendor, and the blob's data key wrapped for the vendor only."""
    store = services.registry.store
    cipher = store.codec
    assert isinstance(cipher, ManifestCipher)
    changes = []
    for row in await store.manifest_rows(0, 100, namespace):
        plain = await cipher.open(row.content, row.digest)
        vendor_sealed = await cipher.seal_for(VENDOR_OWNER, plain, row.digest)
        changes.append((row.id, row.content, vendor_sealed))
    assert await store.replace_manifest_contents(changes) == len(changes) > 0

    driver = encrypted_driver(services)
    assert driver.custody is not None
    path = paths.blob_path(parse_digest(blob_digest))
    header = await driver.read_header(path)
    assert header is not None
    data_key = await driver.data_key(path, header)
    await driver.custody.wrap(header.object_id, data_key, [VENDOR_OWNER])
    async with services.engine.begin() as connection:
        await connection.execute(
            delete(data_key_wraps).where(
                data_key_wraps.c.object_id == header.object_id.hex(),
                data_key_wraps.c.owner == customer_owner(customer),
            )
        )


def pushed_for_vendor(server: ServerProcess) -> tuple[str, str, bytes]:
    """Add a customer, push a manifest into its namespace, and turn what was
    stored into the state a racing push leaves. Return (customer, repository,
    manifest)."""
    customer = unique("acme")
    assert moorage(server, "customer", "add", customer).returncode == 0
    repository = f"{customer}/app"
    with vendor_client(server) as vendor:
        manifest = push_manifest(vendor, repository, unique("racing"))
    server.run_admin(
        lambda s: seal_for_vendor(s, customer, config_digest(manifest), customer)
    )
    assert sealed_owner(server, repository) == VENDOR_OWNER
    assert blob_wrap_owners(server, config_digest(manifest)) == {VENDOR_OWNER}
    return customer, repository, manifest


def test_push_after_customer_add(
    fresh_server: ServerProcess,
) -> None:
    """A server that found no customer for a namespace seals for the customer
    once `customer add` has created it, after a short cache time."""
    customer = unique("acme")
    repository = f"{customer}/app"
    missing = "sha256:" + hashlib.sha256(b"missing config").hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_OCI_CONFIG,
                "digest": missing,
                "size": 1,
            },
            "layers": [],
        }
    ).encode()
    with vendor_client(fresh_server) as vendor:
        # Rejected, but the server looked up the repository's owner: the vendor.
        rejected = vendor.put(
            f"/v2/{repository}/manifests/v1",
            content=manifest,
            headers={"Content-Type": MEDIA_TYPE_OCI_MANIFEST},
        )
        assert rejected.status_code == 400, rejected.text
        looked_up = time.monotonic()
        added = moorage(fresh_server, "customer", "add", customer)
        assert added.returncode == 0, added.stderr
        remaining = custody._VENDOR_OWNER_CACHE_SECONDS - (time.monotonic() - looked_up)
        time.sleep(max(remaining, 0) + 0.2)
        pushed = push_manifest(vendor, repository, unique("after-add"))

    owner = customer_owner(customer)
    assert sealed_owner(fresh_server, repository) == owner
    assert blob_wrap_owners(fresh_server, config_digest(pushed)) == {owner}


def test_claim_namespace_moves_vendor_data(
    fresh_server: ServerProcess,
) -> None:
    """`claim_namespace`, which `customer add` runs, seals the namespace's
    manifests for the customer and moves blob wraps from the vendor to it."""
    customer, repository, manifest = pushed_for_vendor(fresh_server)

    report = fresh_server.run_admin(
        lambda s: maintenance.claim_namespace(
            s.registry.driver, s.registry.store, customer
        )
    )

    assert report.manifests == 1
    assert report.blobs == 1
    owner = customer_owner(customer)
    assert sealed_owner(fresh_server, repository) == owner
    assert blob_wrap_owners(fresh_server, config_digest(manifest)) == {owner}
    with vendor_client(fresh_server) as vendor:
        response = vendor.get(
            f"/v2/{repository}/manifests/v1",
            headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
        )
    assert response.status_code == 200, response.text
    assert response.content == manifest


def test_start_reseals_vendor_manifests(
    fresh_server: ServerProcess,
) -> None:
    """The server's background reseal at start-up seals a manifest that was
    sealed for the vendor in a customer's namespace for the customer."""
    customer, repository, _ = pushed_for_vendor(fresh_server)

    fresh_server.restart()

    owner = customer_owner(customer)
    assert wait_until(lambda: sealed_owner(fresh_server, repository) == owner)
    assert wait_until(lambda: "moved_from_other_owner" in fresh_server.log())


def test_shred_reaches_vendor_sealed_data(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    """`customer shred` moves what was sealed for the vendor in the customer's
    namespace to the customer's key before destroying it, so a copy of the
    database and storage taken afterwards, with the keys, reads none of it."""
    customer, repository, manifest = pushed_for_vendor(fresh_server)
    blob = config_digest(manifest)

    assert moorage(fresh_server, "customer", "suspend", customer).returncode == 0
    shredded = moorage(fresh_server, "customer", "shred", customer, "--confirm")
    assert shredded.returncode == 0, shredded.stderr

    fresh_server.stop()
    copy_dir = tmp_path / "copy"
    shutil.copytree(fresh_server.data_dir, copy_dir)
    copy = ServerProcess(copy_dir, copy_database(fresh_server.database_url, copy_dir))
    try:

        async def read_manifest(services: Services) -> bytes:
            store = services.registry.store
            record = await store.get_tagged_manifest(repository, "v1")
            assert record is not None
            return record.content

        async def read_blob(services: Services) -> bytes:
            path = paths.blob_path(parse_digest(blob))
            return b"".join([c async for c in services.registry.driver.read(path)])

        with pytest.raises(DataKeyUnavailableError):
            copy.run_admin(read_manifest)
        with pytest.raises(DataKeyUnavailableError):
            copy.run_admin(read_blob)
    finally:
        drop_database(copy.database_url)
