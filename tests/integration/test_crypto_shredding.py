"""Crypto-shredding: destroying one customer's key loses only that customer's
blobs and manifests.

Two customers push images that share a base layer (a real busybox layer) and
each adds a private layer; the second customer also mounts a vendor layer.
After the first customer is shredded, everything the second customer and the
vendor reference pulls back byte-identical, while the first customer's
private layer cannot be decrypted: not from the live store, and not from a
copy of the blob store taken before the shredding. The first customer's
manifests cannot be decrypted either, not even from a copy of the database
and storage taken after the shredding together with the installation key,
while the second customer's copy of a manifest that both pushed still serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError

from moorage import admin
from moorage.db.schema import (
    audit_events,
    blobs,
    data_key_wraps,
    manifests,
    repositories,
    repository_blobs,
    sealed_keys,
)
from moorage.digests import parse_digest
from moorage.services import Services
from moorage.storage import paths
from moorage.storage.encryption.custody import DataKeyUnavailableError
from moorage.storage.encryption.driver import (
    EncryptedDriver,
    Envelope,
    envelope_path,
)
from moorage.storage.encryption.format import IntegrityError, wrap_context
from tests.support.database import copy_database, drop_database
from tests.support.identity import push_blob
from tests.support.images import (
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST,
    Blob,
    Layer,
    LayerTar,
    OciLayout,
    add_image,
    busybox_layer_tar,
    host_architecture,
    read_busybox,
)
from tests.support.receivers import wait_until
from tests.support.registry import Account, open_account
from tests.support.server import (
    ADMIN_LOGIN,
    ADMIN_PASSWORD,
    ServerProcess,
    running_server,
    unique,
)

pytestmark = pytest.mark.clients

# Private layers span several 64 KiB segments.
PRIVATE_BYTES = 300 * 1024


@dataclass
class Image:
    repository: str
    manifest: Blob
    config: Blob
    layers: list[Layer]

    def blobs(self) -> dict[str, bytes]:
        found = {self.config.digest: self.config.data}
        found.update({layer.blob.digest: layer.blob.data for layer in self.layers})
        return found


@dataclass
class SharedRegistry:
    """A registry where customers `first` and `second` share a base layer."""

    server: ServerProcess
    first: Account
    second: Account
    vendor: httpx.Client
    base: Layer
    vendor_layer: Layer
    images: dict[str, Image] = field(default_factory=dict)


def private_layer(layout: OciLayout, name: str) -> Layer:
    tar = LayerTar()
    tar.add_file(f"{name}.bin", (name.encode() + b"-private-") * (PRIVATE_BYTES // 20))
    return layout.add_layer(tar.to_bytes(), MEDIA_TYPE_OCI_LAYER_GZIP)


def build_image(
    directory: Path, repository: str, layers: list[Layer], name: str
) -> tuple[OciLayout, Image]:
    layout = OciLayout(directory)
    for layer in layers:
        layout.add_blob(layer.blob.data, layer.blob.media_type)
    mine = private_layer(layout, name)
    manifest = add_image(layout, [*layers, mine], host_architecture())
    layout.tag(manifest, "v1")
    config = json.loads(manifest.data)["config"]
    config_blob = Blob(config["mediaType"], layout.read_blob(config["digest"]))
    return layout, Image(repository, manifest, config_blob, [*layers, mine])


def skopeo_push(server: ServerProcess, layout: OciLayout, image: Image, creds: str):
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"--dest-creds={creds}",
            f"oci:{layout.path}:v1",
            f"docker://{server.address}/{image.repository}:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def skopeo_pull(server: ServerProcess, repository: str, creds: str, target: Path):
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"--src-creds={creds}",
            f"docker://{server.address}/{repository}:v1",
            f"oci:{target}:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def moorage(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return server.run_command(*args)


def creds(account: Account) -> str:
    return f"{account.login}:{account.password}"


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedRegistry]:
    with running_server(tmp_path / "registry") as server:
        first = open_account(server, server.add_customer(unique("first")))
        second = open_account(server, server.add_customer(unique("second")))
        server.run_admin(
            lambda s: admin.add_grant(
                s.identity, second.customer, "products/*", "reader", None
            )
        )
        vendor = httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD), timeout=60
        )
        scratch = OciLayout(tmp_path / "scratch")
        base = scratch.add_layer(
            busybox_layer_tar(read_busybox()), MEDIA_TYPE_OCI_LAYER_GZIP
        )
        registry = SharedRegistry(
            server, first, second, vendor, base, private_layer(scratch, "vendor")
        )
        push_images(registry, tmp_path)
        try:
            yield registry
        finally:
            vendor.close()
            first.client.close()
            second.client.close()


def push_images(registry: SharedRegistry, tmp_path: Path) -> None:
    """Vendor: base + vendor layer. First: base + private. Second: base + the
    vendor layer, mounted from the vendor repository, + private."""
    server = registry.server
    product = f"products/{unique('base')}"
    layout, image = build_image(
        tmp_path / "vendor", product, [registry.base, registry.vendor_layer], "product"
    )
    skopeo_push(server, layout, image, f"{ADMIN_LOGIN}:{ADMIN_PASSWORD}")
    registry.images["vendor"] = image

    first = registry.first
    layout, image = build_image(
        tmp_path / "first", first.repository(), [registry.base], "first"
    )
    skopeo_push(server, layout, image, creds(first))
    registry.images["first"] = image

    second = registry.second
    repository = second.repository()
    response = second.client.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"mount": registry.vendor_layer.blob.digest, "from": product},
    )
    assert response.status_code == 201, response.text
    layout, image = build_image(
        tmp_path / "second",
        repository,
        [registry.base, registry.vendor_layer],
        "second",
    )
    skopeo_push(server, layout, image, creds(second))
    registry.images["second"] = image


def wrap_owners(server: ServerProcess, digest: str) -> set[str]:
    """Return the owners whose keys wrap the stored blob's data key."""

    async def owners(services: Services) -> set[str]:
        driver = services.registry.driver
        assert isinstance(driver, EncryptedDriver)
        assert driver.custody is not None
        path = paths.blob_path(parse_digest(digest))
        header = await driver.read_header(path)
        assert header is not None
        return set(await driver.custody.owners(header.object_id))

    return server.run_admin(owners)


def read_blob(server: ServerProcess, digest: str) -> bytes:
    """Decrypt a stored blob through the storage driver, as the server would."""

    async def read(services: Services) -> bytes:
        path = paths.blob_path(parse_digest(digest))
        chunks = [chunk async for chunk in services.registry.driver.read(path)]
        return b"".join(chunks)

    return server.run_admin(read)


def assert_pulls(client: httpx.Client, image: Image) -> None:
    """The manifest and every blob of the image come back byte-identical."""
    response = client.get(
        f"/v2/{image.repository}/manifests/v1",
        headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 200, response.text
    assert response.content == image.manifest.data
    for digest, data in image.blobs().items():
        response = client.get(f"/v2/{image.repository}/blobs/{digest}")
        assert response.status_code == 200, (digest, response.text)
        assert response.content == data, digest


def assert_pull_destroyed(client: httpx.Client, repository: str, digest: str) -> None:
    """A pull of a blob whose data key was shredded gets BLOB_UNKNOWN, saying so."""
    response = client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 404, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "BLOB_UNKNOWN"
    assert error["detail"] == {"digest": digest, "reason": "data key destroyed"}
    assert "data key was destroyed" in error["message"]


def assert_head_destroyed(client: httpx.Client, repository: str, digest: str) -> None:
    """A HEAD of a shredded blob gets 404, as its GET does."""
    response = client.head(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 404, digest


def log_events(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    """Return the server's JSON log lines whose event is `event`."""
    found = []
    for line in server.log().splitlines():
        if line.startswith("{") and event in line:
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


def shred(registry: SharedRegistry) -> None:
    server, slug = registry.server, registry.first.customer
    assert moorage(server, "customer", "suspend", slug).returncode == 0
    result = moorage(server, "customer", "shred", slug, "--confirm")
    assert result.returncode == 0, result.stderr
    assert "key destroyed" in result.stdout


def test_wraps_follow_references(shared: SharedRegistry) -> None:
    """Each blob's data key is wrapped for exactly the owners that use it."""
    server = shared.server
    first = f"customer:{shared.first.customer}"
    second = f"customer:{shared.second.customer}"
    assert wrap_owners(server, shared.base.blob.digest) == {"vendor", first, second}
    assert wrap_owners(server, shared.vendor_layer.blob.digest) == {"vendor", second}
    assert wrap_owners(server, shared.images["first"].layers[-1].blob.digest) == {first}
    assert wrap_owners(server, shared.images["second"].layers[-1].blob.digest) == {
        second
    }
    envelopes = list((server.data_dir / "storage" / ".keys").rglob("*"))
    assert [path for path in envelopes if path.is_file()] == []


def test_shred_keeps_shared_blobs(shared: SharedRegistry, tmp_path: Path) -> None:
    """After shredding the first customer, the second and the vendor pull everything
    byte-identical, and the first customer's private layer fails to decrypt."""
    server = shared.server
    private = shared.images["first"].layers[-1].blob.digest
    backup = tmp_path / "storage-before"
    shutil.copytree(server.data_dir / "storage", backup)

    shred(shared)

    # The running server loses the private layer at once.
    assert_pull_destroyed(shared.vendor, shared.images["first"].repository, private)
    server.restart()
    assert_pulls(shared.second.client, shared.images["second"])
    assert_pulls(shared.vendor, shared.images["vendor"])
    skopeo_pull(
        server,
        shared.images["second"].repository,
        creds(shared.second),
        tmp_path / "pulled",
    )
    pulled = OciLayout(tmp_path / "pulled")
    for digest, data in shared.images["second"].blobs().items():
        assert pulled.read_blob(digest) == data
    assert_pull_destroyed(shared.vendor, shared.images["first"].repository, private)
    with pytest.raises(DataKeyUnavailableError):
        read_blob(server, private)
    # Destroyed on purpose and marked so: the server answers from the database
    # without opening the data key, and reports no tampering.
    assert log_events(server, "object data key unavailable") == []
    assert "storage integrity error" not in server.log()

    # The first customer's config blob was its own too.
    with pytest.raises(IntegrityError):
        read_blob(server, shared.images["first"].config.digest)

    rows = server.run_admin(lambda s: _select(s, sealed_keys.c.name))
    assert f"customer:{shared.first.customer}" not in rows
    assert f"customer:{shared.second.customer}" in rows
    owners = server.run_admin(lambda s: _select(s, data_key_wraps.c.owner))
    assert f"customer:{shared.first.customer}" not in owners

    events = server.run_admin(
        lambda s: _select(
            s, audit_events.c.action, audit_events.c.outcome, audit_events.c.reason
        )
    )
    shreds = [row for row in events if row[0] == "customer.shred"]
    assert [row[1] for row in shreds] == ["success"], events
    counts = re.search(
        r"key destroyed, [1-9]\d* data key wraps deleted, [1-9]\d* objects now "
        r"unreadable \([1-9]\d* of them blobs\)",
        shreds[0][2],
    )
    assert counts is not None, shreds[0][2]


def test_push_replaces_shredded_copy(shared: SharedRegistry) -> None:
    """After shredding, a mount of the lost blob starts an upload instead, and
    pushing the same bytes again replaces the copy that no key opens."""
    first = shared.images["first"]
    layer = first.layers[-1].blob
    shred(shared)
    repository = f"products/{unique('again')}"
    response = shared.vendor.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"mount": layer.digest, "from": first.repository},
    )
    assert response.status_code == 202, response.text
    response = shared.vendor.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"digest": layer.digest},
        content=layer.data,
    )
    assert response.status_code == 201, response.text
    response = shared.vendor.get(f"/v2/{repository}/blobs/{layer.digest}")
    assert response.status_code == 200
    assert response.content == layer.data
    assert wrap_owners(shared.server, layer.digest) == {"vendor"}
    # The new copy is readable, so the shredded customer's repository, which
    # still links the digest, serves it again.
    response = shared.vendor.head(f"/v2/{first.repository}/blobs/{layer.digest}")
    assert response.status_code == 200


def test_backup_from_before_stays_unreadable(
    shared: SharedRegistry, tmp_path: Path
) -> None:
    """A copy of the blob store taken before the shredding, with the database after
    it, decrypts the shared blobs but not the shredded customer's own."""
    server = shared.server
    first = shared.images["first"]
    private = first.layers[-1].blob.digest
    assert read_blob(server, private) == first.layers[-1].blob.data
    backup = tmp_path / "storage-before"
    shutil.copytree(server.data_dir / "storage", backup)

    shred(shared)

    server.stop()
    storage = server.data_dir / "storage"
    shutil.rmtree(storage)
    shutil.copytree(backup, storage)

    with pytest.raises(DataKeyUnavailableError):
        read_blob(server, private)
    with pytest.raises(IntegrityError):
        read_blob(server, first.config.digest)
    assert read_blob(server, shared.base.blob.digest) == shared.base.blob.data
    for digest, data in shared.images["second"].blobs().items():
        assert read_blob(server, digest) == data

    # No installation envelope in the copy contains the private layer's data key.
    header = (storage / _relative(private)).read_bytes()[:32]
    object_id = header[8:24]
    assert not (storage / envelope_path(object_id)).exists()
    server.start()
    assert_pulls(shared.second.client, shared.images["second"])


def test_shred_needs_suspension_and_confirm(shared: SharedRegistry) -> None:
    """Shredding an active customer, or without --confirm, destroys nothing."""
    server, slug = shared.server, shared.first.customer
    result = moorage(server, "customer", "shred", slug)
    assert result.returncode == 2
    assert "--confirm" in result.stderr
    result = moorage(server, "customer", "shred", slug, "--confirm")
    assert result.returncode == 1
    assert "suspend it first" in result.stderr
    assert_pulls(shared.first.client, shared.images["first"])
    rows = server.run_admin(lambda s: _select(s, sealed_keys.c.name))
    assert f"customer:{slug}" in rows


def test_rotation_and_reencrypt_keep_owner_wraps(shared: SharedRegistry) -> None:
    """Key rotation rewraps owner keys; re-encryption wraps new data keys for the
    same owners; shredding afterwards still spares shared blobs."""
    server = shared.server
    before = server.run_admin(lambda s: _select(s, sealed_keys.c.key_id))
    result = moorage(server, "key", "rotate")
    assert result.returncode == 0, result.stderr
    after = server.run_admin(lambda s: _select(s, sealed_keys.c.key_id))
    assert len(set(after)) == 1
    assert not set(after) & set(before)
    assert_pulls(shared.second.client, shared.images["second"])

    result = moorage(server, "key", "reencrypt")
    assert result.returncode == 0, result.stderr
    first = f"customer:{shared.first.customer}"
    second = f"customer:{shared.second.customer}"
    assert wrap_owners(server, shared.base.blob.digest) == {"vendor", first, second}
    assert wrap_owners(server, shared.images["first"].layers[-1].blob.digest) == {first}
    assert_pulls(shared.first.client, shared.images["first"])

    shred(shared)
    server.restart()
    assert_pulls(shared.second.client, shared.images["second"])
    assert_pulls(shared.vendor, shared.images["vendor"])
    with pytest.raises(DataKeyUnavailableError):
        read_blob(server, shared.images["first"].layers[-1].blob.digest)


def test_reencrypt_skips_shredded_blobs(shared: SharedRegistry) -> None:
    """Re-encryption after a shredding skips the blobs nothing can read any more,
    finishes, and leaves every other blob readable."""
    server = shared.server
    shred(shared)
    result = moorage(server, "key", "reencrypt")
    assert result.returncode == 0, result.stderr
    assert "blobs re-encrypted" in result.stdout
    assert re.search(r"\b[1-9][0-9]* blobs skipped", result.stdout)
    # The shredded customer gets no key and no wrap back: the base layer, which
    # it shared, is re-encrypted for the other owners only.
    first = f"customer:{shared.first.customer}"
    owners = server.run_admin(lambda s: _select(s, sealed_keys.c.name))
    assert first not in owners
    second = f"customer:{shared.second.customer}"
    assert wrap_owners(server, shared.base.blob.digest) == {"vendor", second}
    wrapped = server.run_admin(lambda s: _select(s, data_key_wraps.c.owner))
    assert first not in wrapped
    server.restart()
    assert_pulls(shared.second.client, shared.images["second"])
    assert_pulls(shared.vendor, shared.images["vendor"])
    private = shared.images["first"].layers[-1].blob.digest
    assert_pull_destroyed(shared.vendor, shared.images["first"].repository, private)


def test_upload_open_during_shred_starts_again(shared: SharedRegistry) -> None:
    """An upload begun before its customer was shredded is cancelled with
    BLOB_UPLOAD_UNKNOWN on its next chunk, and a new upload then works."""
    server, first = shared.server, shared.first
    repository = first.repository()
    data = os.urandom(200_000)
    started = first.client.post(f"/v2/{repository}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    chunk = first.client.patch(
        location,
        content=data[:100_000],
        headers={"Content-Type": "application/octet-stream"},
    )
    assert chunk.status_code == 202, chunk.text

    shred(shared)
    assert moorage(server, "customer", "resume", first.customer).returncode == 0
    rest = first.client.patch(
        chunk.headers["Location"],
        content=data[100_000:],
        headers={"Content-Type": "application/octet-stream"},
    )
    assert rest.status_code == 404, rest.text
    assert rest.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert "shredded" in rest.json()["errors"][0]["message"]

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    again = first.client.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"digest": digest},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert again.status_code == 201, again.text
    assert first.client.get(f"/v2/{repository}/blobs/{digest}").content == data


def test_deleting_last_reference_drops_the_wrap(shared: SharedRegistry) -> None:
    """A customer that deletes its last link to a shared blob loses its wrap, so
    shredding it later does not matter to that blob; the last wrap stays."""
    server = shared.server
    first, second = shared.first, shared.second
    data = b"shared-standalone-" * 5000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    for account in (first, second):
        response = account.client.post(
            f"/v2/{account.repository('loose')}/blobs/uploads/",
            params={"digest": digest},
            content=data,
        )
        assert response.status_code == 201, response.text
    owners = {f"customer:{first.customer}", f"customer:{second.customer}"}
    assert wrap_owners(server, digest) == owners
    deleter = open_account(server, second.customer, "maintainer")
    try:
        repository = _repository_with(server, second.customer, digest)
        response = deleter.client.delete(f"/v2/{repository}/blobs/{digest}")
        assert response.status_code == 202, response.text
    finally:
        deleter.client.close()
    assert wrap_owners(server, digest) == {f"customer:{first.customer}"}
    response = first.client.get(
        f"/v2/{_repository_with(server, first.customer, digest)}/blobs/{digest}"
    )
    assert response.content == data


def _repository_with(server: ServerProcess, customer: str, digest: str) -> str:
    async def find(services: Services) -> str:
        async with services.engine.connect() as connection:
            name = await connection.scalar(
                select(repositories.c.name)
                .join(
                    repository_blobs,
                    repository_blobs.c.repository_id == repositories.c.id,
                )
                .where(
                    repository_blobs.c.digest == digest,
                    repositories.c.namespace == customer,
                )
            )
        assert name is not None
        return str(name)

    return server.run_admin(find)


def _relative(digest: str) -> str:
    return paths.blob_path(parse_digest(digest))


async def _select(services: Services, *columns: Any) -> list[Any]:
    async with services.engine.connect() as connection:
        result = await connection.execute(select(*columns))
        rows = result.all()
    if len(columns) == 1:
        return [row[0] for row in rows]
    return [tuple(row) for row in rows]


def make_legacy(server: ServerProcess) -> int:
    """Turn every owner wrap back into an installation envelope, as an
    installation from before owner keys stored them; return how many."""

    async def convert(services: Services) -> int:
        driver = services.registry.driver
        assert isinstance(driver, EncryptedDriver)
        assert driver.custody is not None
        converted = 0
        for path in await driver.list(paths.BLOBS_PREFIX):
            header = await driver.read_header(path)
            assert header is not None
            data_key = await driver.custody.unwrap(path, header.object_id)
            assert data_key is not None
            kek = driver.keyring.active()
            envelope = Envelope(
                kek.key_id, kek.wrap(data_key, wrap_context(header.object_id))
            )
            await driver.inner.put(envelope_path(header.object_id), envelope.to_bytes())
            await driver.custody.forget([header.object_id])
            converted += 1
        return converted

    return server.run_admin(convert)


def envelope_files(server: ServerProcess) -> list[Path]:
    keys = server.data_dir / "storage" / ".keys"
    return [path for path in keys.rglob("*") if path.is_file()]


def test_reencrypt_moves_envelopes_to_owner_keys(shared: SharedRegistry) -> None:
    """Blobs that only the installation key wraps still pull; `key reencrypt`
    gives them owner wraps and deletes the envelopes, so shredding works."""
    server = shared.server
    server.stop()
    assert make_legacy(server) > 0
    assert wrap_owners(server, shared.base.blob.digest) == set()
    for digest, data in shared.images["first"].blobs().items():
        assert read_blob(server, digest) == data

    result = moorage(server, "key", "reencrypt")
    assert result.returncode == 0, result.stderr
    assert envelope_files(server) == []
    first = f"customer:{shared.first.customer}"
    second = f"customer:{shared.second.customer}"
    assert wrap_owners(server, shared.base.blob.digest) == {"vendor", first, second}

    shred(shared)
    server.start()
    assert_pulls(shared.second.client, shared.images["second"])
    with pytest.raises(DataKeyUnavailableError):
        read_blob(server, shared.images["first"].layers[-1].blob.digest)


def test_server_adopts_envelopes_at_start(shared: SharedRegistry) -> None:
    """A server started on blobs with installation envelopes wraps their data
    keys for their owners in the background, without rewriting the blobs."""
    server = shared.server
    server.stop()
    make_legacy(server)
    private = shared.images["first"].layers[-1].blob.digest
    stored = server.data_dir / "storage" / _relative(private)
    before = stored.read_bytes()
    server.start()
    deadline = time.monotonic() + 60
    while envelope_files(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert envelope_files(server) == []
    # Info lines reach the log file in batches, after the envelopes go.
    assert wait_until(
        lambda: "data keys moved from envelopes to owner keys" in server.log()
    )
    assert stored.read_bytes() == before
    assert wrap_owners(server, private) == {f"customer:{shared.first.customer}"}
    assert_pulls(shared.first.client, shared.images["first"])


def test_head_after_shred(shared: SharedRegistry) -> None:
    """After shredding, HEAD and GET of the customer's own blobs answer 404
    BLOB_UNKNOWN in its repositories, while its shared base layer and the other
    customer's blobs answer 200 with their sizes."""
    first = shared.images["first"]
    own = {first.config.digest, first.layers[-1].blob.digest}
    shred(shared)

    for digest in own:
        assert_head_destroyed(shared.vendor, first.repository, digest)
        assert_pull_destroyed(shared.vendor, first.repository, digest)
    base = shared.base.blob
    response = shared.vendor.head(f"/v2/{first.repository}/blobs/{base.digest}")
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(base.data))
    second = shared.images["second"]
    for digest, data in second.blobs().items():
        response = shared.second.client.head(f"/v2/{second.repository}/blobs/{digest}")
        assert response.status_code == 200, digest
        assert response.headers["Content-Length"] == str(len(data))

    async def marked(services: Services) -> set[str]:
        async with services.engine.connect() as connection:
            result = await connection.execute(
                select(blobs.c.digest).where(blobs.c.shredded_at.is_not(None))
            )
            return {row.digest for row in result}

    assert shared.server.run_admin(marked) == own
    assert log_events(shared.server, "object data key unavailable") == []


def test_shredded_blob_cannot_be_referenced(shared: SharedRegistry) -> None:
    """A manifest pushed after shredding cannot name a shredded blob, and a
    mount of it starts an upload instead."""
    first = shared.images["first"]
    shred(shared)
    response = shared.vendor.put(
        f"/v2/{first.repository}/manifests/again",
        content=first.manifest.data,
        headers={"Content-Type": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"


def push_annotated(client: httpx.Client, repository: str, marker: str) -> bytes:
    """Push a manifest annotated with `marker` as tag `shared`; return its bytes.

    Pushes of the same marker produce the same manifest, in any repository.
    """
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_OCI_CONFIG,
                "digest": push_blob(client, repository, config),
                "size": len(config),
            },
            "layers": [],
            "annotations": {"note": marker},
        }
    ).encode()
    response = client.put(
        f"/v2/{repository}/manifests/shared",
        content=manifest,
        headers={"Content-Type": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 201, response.text
    return manifest


def assert_manifest_destroyed(
    client: httpx.Client, repository: str, reference: str
) -> None:
    """A GET of a manifest sealed under a shredded key gets MANIFEST_UNKNOWN,
    saying so."""
    response = client.get(
        f"/v2/{repository}/manifests/{reference}",
        headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 404, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["detail"] == {"reference": reference, "reason": "data key destroyed"}


def test_shred_makes_manifests_unreadable(
    shared: SharedRegistry, tmp_path: Path
) -> None:
    """After shredding, the first customer's manifests open neither in the
    server nor from a copy of the database and storage made with the keys,
    while the second customer's row of a manifest both pushed still serves."""
    server = shared.server
    first, second = shared.images["first"], shared.images["second"]
    marker = unique("first-and-second")
    pushed = push_annotated(shared.first.client, first.repository, marker)
    assert push_annotated(shared.second.client, second.repository, marker) == pushed
    rows = server.run_admin(_manifest_annotations)
    assert not any(marker in (value or "") for value in rows.values())
    # Versions that kept the annotations of every manifest in plaintext.
    server.run_admin(lambda s: _set_annotations(s, first.repository, marker))

    shred(shared)
    server.restart()
    assert_manifest_destroyed(shared.vendor, first.repository, "v1")
    assert_manifest_destroyed(shared.vendor, first.repository, "shared")
    response = shared.second.client.get(
        f"/v2/{second.repository}/manifests/shared",
        headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 200, response.text
    assert response.content == pushed
    assert_pulls(shared.second.client, second)
    assert_pulls(shared.vendor, shared.images["vendor"])
    assert "storage integrity error" not in server.log()

    server.stop()
    copy_dir = tmp_path / "copy"
    shutil.copytree(server.data_dir, copy_dir)
    copy = ServerProcess(copy_dir, copy_database(server.database_url, copy_dir))
    try:
        rows = copy.run_admin(_manifest_rows)
        assert marker.encode() not in b"".join(rows.values())
        annotations = copy.run_admin(_manifest_annotations)
        assert not any(marker in (value or "") for value in annotations.values())
        assert first.manifest.data not in b"".join(rows.values())

        async def read(services: Services, repository: str, tag: str) -> bytes:
            record = await services.registry.store.get_tagged_manifest(repository, tag)
            assert record is not None
            return record.content

        for tag in ("v1", "shared"):
            with pytest.raises(DataKeyUnavailableError):
                copy.run_admin(lambda s, tag=tag: read(s, first.repository, tag))
        assert copy.run_admin(lambda s: read(s, second.repository, "shared")) == pushed
        assert copy.run_admin(lambda s: read(s, second.repository, "v1")) == (
            second.manifest.data
        )
    finally:
        drop_database(copy.database_url)


def test_push_after_shred_replaces_manifest(shared: SharedRegistry) -> None:
    """After shredding and resuming a customer, pushing the same manifest again
    makes it readable by its old tag, by digest and by a new tag."""
    server, first = shared.server, shared.first
    repository = first.repository()
    marker = unique("again")
    pushed = push_annotated(first.client, repository, marker)
    digest = "sha256:" + hashlib.sha256(pushed).hexdigest()

    shred(shared)
    assert moorage(server, "customer", "resume", first.customer).returncode == 0
    assert_manifest_destroyed(first.client, repository, "shared")
    assert push_annotated(first.client, repository, marker) == pushed
    response = first.client.put(
        f"/v2/{repository}/manifests/later",
        content=pushed,
        headers={"Content-Type": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 201, response.text

    for reference in ("shared", digest, "later"):
        response = first.client.get(
            f"/v2/{repository}/manifests/{reference}",
            headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
        )
        assert response.status_code == 200, (reference, response.text)
        assert response.content == pushed, reference
    assert "storage integrity error" not in server.log()


async def _manifest_annotations(services: Services) -> dict[str, str | None]:
    """Return the plaintext annotations column of every manifest row."""
    async with services.engine.connect() as connection:
        result = await connection.execute(
            select(
                repositories.c.name, manifests.c.digest, manifests.c.annotations
            ).join(repositories, repositories.c.id == manifests.c.repository_id)
        )
        return {f"{row.name}@{row.digest}": row.annotations for row in result}


async def _set_annotations(services: Services, repository: str, marker: str) -> None:
    async with services.engine.begin() as connection:
        await connection.execute(
            update(manifests)
            .where(
                manifests.c.repository_id.in_(
                    select(repositories.c.id).where(repositories.c.name == repository)
                )
            )
            .values(annotations=json.dumps({"note": marker}))
        )


async def _manifest_rows(services: Services) -> dict[str, bytes]:
    """Return the stored content of every manifest row, by repository and digest."""
    async with services.engine.connect() as connection:
        result = await connection.execute(
            select(repositories.c.name, manifests.c.digest, manifests.c.content).join(
                repositories, repositories.c.id == manifests.c.repository_id
            )
        )
        return {f"{row.name}@{row.digest}": bytes(row.content) for row in result}


async def _owner_key_material(
    services: Services, owner: str
) -> tuple[bytes, list[bytes]]:
    """Return the owner's wrapped KEK and the data key wraps made under it."""
    async with services.engine.connect() as connection:
        kek = await connection.scalar(
            select(sealed_keys.c.wrapped).where(sealed_keys.c.name == owner)
        )
        wraps = await connection.scalars(
            select(data_key_wraps.c.wrapped).where(data_key_wraps.c.owner == owner)
        )
        assert kek is not None
        return bytes(kek), [bytes(wrap) for wrap in wraps]


def sqlite_files(server: ServerProcess) -> tuple[Path, Path]:
    database = Path(server.database_url.split(":///", 1)[1])
    return database, database.with_name(database.name + "-wal")


def test_shred_leaves_no_key_in_sqlite_files(shared: SharedRegistry) -> None:
    """After a shredding with the server running, neither a copy of the main
    database file nor the -wal file contains the wrapped KEK or its wraps."""
    server = shared.server
    if not server.database_url.startswith("sqlite"):
        pytest.skip("checks SQLite's files")
    owner = f"customer:{shared.first.customer}"
    kek, wraps = server.run_admin(lambda s: _owner_key_material(s, owner))
    assert len(kek) >= 32
    assert wraps
    database, wal = sqlite_files(server)
    before = database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert kek in before, "the scan cannot see the key before shredding"

    shred(shared)
    # A file copy of the main file alone, as a backup tool that skips -wal makes.
    copy = database.read_bytes()
    assert kek not in copy
    for wrap in wraps:
        assert wrap not in copy
    if wal.exists():
        left = wal.read_bytes()
        assert kek not in left
        for wrap in wraps:
            assert wrap not in left
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM sealed_keys")}
    assert owner not in names
    assert_pulls(shared.second.client, shared.images["second"])


def test_shred_leaves_no_kek_in_postgresql_files(shared: SharedRegistry) -> None:
    """After a shredding, no file of the database's own directory contains the
    wrapped KEK. The write-ahead log in pg_wal still may, and is not checked."""
    server = shared.server
    if not server.database_url.startswith("postgresql"):
        pytest.skip("checks PostgreSQL's files")
    owner = f"customer:{shared.first.customer}"
    kek, _ = server.run_admin(lambda s: _owner_key_material(s, owner))

    async def relation_file(services: Services) -> Path:
        async with services.engine.connect() as connection:
            autocommit = await connection.execution_options(
                isolation_level="AUTOCOMMIT"
            )
            # Writes the row from shared buffers to the table's file.
            await autocommit.exec_driver_sql("CHECKPOINT")
            data = await autocommit.scalar(text("SHOW data_directory"))
            relative = await autocommit.scalar(
                text("SELECT pg_relation_filepath('sealed_keys')")
            )
        return Path(data) / relative

    try:
        table_file = server.run_admin(relation_file)
        before = table_file.read_bytes()
    except (DBAPIError, PermissionError, FileNotFoundError) as error:
        pytest.skip(f"cannot read PostgreSQL's data files here: {error}")
    assert kek in before, "the scan cannot see the key before shredding"

    shred(shared)
    table_file_after = server.run_admin(relation_file)
    database_files = [path for path in table_file.parent.iterdir() if path.is_file()]
    for path in database_files:
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            continue  # dropped meanwhile
        assert kek not in content, path
    assert table_file_after != table_file, "VACUUM FULL did not rewrite sealed_keys"
    assert table_file_after in database_files
    assert_pulls(shared.second.client, shared.images["second"])
