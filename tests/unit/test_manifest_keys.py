"""Manifest content sealed per owner: sealing, shredding, migration, caching."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage import admin
from moorage.db.engine import create_engine, migrate
from moorage.db.identity_store import IdentityStore
from moorage.db.key_store import KeyStore
from moorage.db.registry_store import NewManifest, RegistryStore
from moorage.db.schema import manifests, repositories, sealed_keys
from moorage.db.wrap_store import WrapStore
from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.encryption import maintenance
from moorage.storage.encryption import manifests as manifest_keys
from moorage.storage.encryption.custody import DataKeyCustody, OwnerKeys
from moorage.storage.encryption.database import open_database_cipher
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.format import DataKeyUnavailableError, IntegrityError
from moorage.storage.encryption.keys import FileKeyring
from moorage.storage.encryption.manifests import ManifestCipher, reseal_manifests
from tests.support.database import create_database, drop_database


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated database of the backend under test (docs/testing.md)."""
    url = create_database(tmp_path)
    engine = create_engine(url)
    await migrate(engine)
    yield engine
    await engine.dispose()
    drop_database(url)


class Process:
    """The encryption parts one server or CLI process holds."""

    def __init__(
        self, tmp_path: Path, engine: AsyncEngine, errors: list[IntegrityError]
    ) -> None:
        keyring = FileKeyring(tmp_path / "keys")
        self.driver = EncryptedDriver(
            FilesystemDriver(tmp_path / "storage", fsync=False), keyring
        )
        self.driver.custody = DataKeyCustody(
            OwnerKeys(KeyStore(engine), keyring), WrapStore(engine)
        )
        self.tmp_path = tmp_path
        self.engine = engine
        self.errors = errors

    def again(self, errors: list[IntegrityError] | None = None) -> Process:
        """The same parts in another process, with nothing cached."""
        return Process(self.tmp_path, self.engine, [] if errors is None else errors)

    async def store(self) -> RegistryStore:
        database = await open_database_cipher(
            KeyStore(self.engine), self.driver.keyring
        )
        assert self.driver.custody is not None
        cipher = ManifestCipher(
            self.driver.custody, database, on_integrity_error=self.errors.append
        )
        return RegistryStore(self.engine, cipher)


def manifest(marker: str) -> NewManifest:
    content = f'{{"schemaVersion":2,"annotations":{{"m":"{marker}"}}}}'.encode()
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    return NewManifest(digest, "application/vnd.oci.image.manifest.v1+json", content)


async def add_customer(engine: AsyncEngine, slug: str) -> None:
    await admin.add_customer(IdentityStore(engine), slug, slug.title(), None)


def in_repository(repository: str) -> Any:
    """Return a WHERE clause for the manifest rows of a repository."""
    return manifests.c.repository_id.in_(
        select(repositories.c.id).where(repositories.c.name == repository)
    )


async def stored_content(engine: AsyncEngine, repository: str) -> bytes:
    async with engine.connect() as connection:
        content = await connection.scalar(
            select(manifests.c.content).where(in_repository(repository))
        )
    assert content is not None
    return bytes(content)


async def overwrite(engine: AsyncEngine, repository: str, content: bytes) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            update(manifests).where(in_repository(repository)).values(content=content)
        )


async def shred(process: Process, owner: str) -> maintenance.ShredReport:
    return await maintenance.shred_owner(process.driver, owner, await process.store())


@pytest.fixture
async def shared(tmp_path: Path, engine: AsyncEngine) -> Process:
    """Customers a and b, each with one repository holding the same manifest,
    and a repository of a holding a manifest of its own."""
    await add_customer(engine, "a")
    await add_customer(engine, "b")
    process = Process(tmp_path, engine, [])
    store = await process.store()
    await store.put_manifest("a/app", manifest("shared"), "v1")
    await store.put_manifest("b/app", manifest("shared"), "v1")
    await store.put_manifest("a/own", manifest("own"), "v1")
    return process


async def test_rows_are_sealed_for_their_owners(shared: Process) -> None:
    """Each row names its repository's owner and keeps no plaintext."""
    store = await shared.store()
    for repository, owner in (("a/app", b"customer:a"), ("b/app", b"customer:b")):
        content = await stored_content(shared.engine, repository)
        assert content.startswith(manifest_keys.MAGIC)
        assert owner in content
        assert b"shared" not in content
    record = await store.get_tagged_manifest("b/app", "v1")
    assert record is not None
    assert record.content == manifest("shared").content
    assert record.size == len(manifest("shared").content)


async def test_shred_keeps_the_other_owners_row(shared: Process) -> None:
    """After shredding a, its rows do not open in a new process; b's row of the
    same manifest does."""
    report = await shred(shared, "customer:a")
    assert report.manifests_unreadable == 2

    store = await shared.again().store()
    record = await store.get_tagged_manifest("b/app", "v1")
    assert record is not None
    assert record.content == manifest("shared").content
    for repository in ("a/app", "a/own"):
        with pytest.raises(DataKeyUnavailableError):
            await store.get_tagged_manifest(repository, "v1")
    assert shared.errors == []


async def test_running_process_stops_opening_shredded_rows(
    shared: Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that opened a row before the shredding stops opening it once
    it reads its owner key again, cache or not."""
    store = await shared.store()
    assert await store.get_tagged_manifest("a/own", "v1") is not None
    await shred(shared.again(), "customer:a")
    # Within the recheck interval the cached key still opens the row.
    assert await store.get_tagged_manifest("a/own", "v1") is not None
    monkeypatch.setattr(manifest_keys, "OWNER_KEY_RECHECK_SECONDS", 0.0)
    with pytest.raises(DataKeyUnavailableError):
        await store.get_tagged_manifest("a/own", "v1")
    assert await store.get_tagged_manifest("b/app", "v1") is not None


async def test_recreated_owner_key_opens_only_new_rows(shared: Process) -> None:
    """A customer resumed after shredding gets a new key: rows sealed after it
    open, rows sealed before stay shredded."""
    await shred(shared, "customer:a")
    store = await shared.store()
    await store.put_manifest("a/new", manifest("new"), "v1")
    record = await store.get_tagged_manifest("a/new", "v1")
    assert record is not None
    assert record.content == manifest("new").content
    with pytest.raises(DataKeyUnavailableError):
        await store.get_tagged_manifest("a/own", "v1")


async def test_push_after_shred_replaces_row(shared: Process) -> None:
    """Pushing a manifest again after its owner was shredded seals the row under
    the new owner key: the old tag, the digest and a new tag all open it."""
    await shred(shared, "customer:a")
    own = manifest("own")
    store = await shared.again().store()
    await store.put_manifest("a/own", own, "v2")

    for record in (
        await store.get_tagged_manifest("a/own", "v1"),
        await store.get_tagged_manifest("a/own", "v2"),
        await store.get_manifest("a/own", own.digest),
    ):
        assert record is not None
        assert record.content == own.content
    with pytest.raises(DataKeyUnavailableError):
        await store.get_tagged_manifest("a/app", "v1")
    assert shared.errors == []


async def test_concurrent_pushes_after_shred(shared: Process) -> None:
    """Two processes pushing the same manifest at once after a shredding both
    succeed, and the row they leave opens in either."""
    await shred(shared, "customer:a")
    own = manifest("own")
    first = await shared.again().store()
    second = await shared.again().store()
    await asyncio.gather(
        first.put_manifest("a/own", own, "v1"),
        second.put_manifest("a/own", own, "v1"),
    )

    for store in (first, second):
        record = await store.get_tagged_manifest("a/own", "v1")
        assert record is not None
        assert record.content == own.content


async def test_push_of_readable_manifest_keeps_row(shared: Process) -> None:
    """Pushing a readable manifest again leaves its stored row as it was."""
    before = await stored_content(shared.engine, "a/own")
    await (await shared.store()).put_manifest("a/own", manifest("own"), "v2")
    assert await stored_content(shared.engine, "a/own") == before


async def test_lost_owner_key_is_an_integrity_error(shared: Process) -> None:
    """An owner key deleted without shredding is damage, reported as such."""
    async with shared.engine.begin() as connection:
        await connection.execute(
            sealed_keys.delete().where(sealed_keys.c.name == "customer:a")
        )
    errors: list[IntegrityError] = []
    store = await shared.again(errors).store()
    with pytest.raises(IntegrityError) as raised:
        await store.get_tagged_manifest("a/own", "v1")
    assert not isinstance(raised.value, DataKeyUnavailableError)
    assert [error.reason for error in errors] == [raised.value.reason]
    assert "not shredded" in raised.value.reason


@pytest.mark.parametrize("offset", [10, -20, -1])
async def test_tampered_row_fails(shared: Process, offset: int) -> None:
    """A changed byte in the owner key id, the wrap or the ciphertext fails."""
    content = bytearray(await stored_content(shared.engine, "a/own"))
    content[offset] ^= 1
    await overwrite(shared.engine, "a/own", bytes(content))
    store = await shared.store()
    with pytest.raises(IntegrityError) as raised:
        await store.get_tagged_manifest("a/own", "v1")
    assert not isinstance(raised.value, DataKeyUnavailableError)
    assert shared.errors == [raised.value]


async def test_old_rows_are_resealed_for_owners(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """Rows in plaintext and rows sealed with the database data key read as
    they are, and the conversion seals them for their owners."""
    await add_customer(engine, "a")
    process = Process(tmp_path, engine, [])
    plain = RegistryStore(engine)
    await plain.put_manifest("a/plain", manifest("plain"), "v1")
    await plain.put_manifest("a/old", manifest("old"), "v1")
    database = await open_database_cipher(KeyStore(engine), process.driver.keyring)
    old = manifest("old")
    await overwrite(engine, "a/old", database.seal(old.content, old.digest))

    store = await process.store()
    for repository, marker in (("a/plain", "plain"), ("a/old", "old")):
        record = await store.get_tagged_manifest(repository, "v1")
        assert record is not None
        assert record.content == manifest(marker).content
    report = await reseal_manifests(store)
    assert report.resealed == 2
    assert (await reseal_manifests(store)).resealed == 0
    for repository in ("a/plain", "a/old"):
        content = await stored_content(engine, repository)
        assert content.startswith(manifest_keys.MAGIC)
        assert b"customer:a" in content

    await shred(process, "customer:a")
    with pytest.raises(DataKeyUnavailableError):
        await (await process.store()).get_tagged_manifest("a/old", "v1")


async def test_renew_gives_new_data_keys(shared: Process) -> None:
    """`key reencrypt` seals every row again and skips shredded ones."""
    before = await stored_content(shared.engine, "b/app")
    await shred(shared, "customer:a")
    report = await reseal_manifests(await shared.store(), renew=True)
    assert report.resealed == 1
    assert report.shredded == 2
    after = await stored_content(shared.engine, "b/app")
    assert after != before
    record = await (await shared.store()).get_tagged_manifest("b/app", "v1")
    assert record is not None
    assert record.content == manifest("shared").content


async def test_shred_seals_old_rows_first(tmp_path: Path, engine: AsyncEngine) -> None:
    """Shredding seals the owner's rows still under the database data key for
    it before destroying its key, so none stays readable."""
    await add_customer(engine, "a")
    process = Process(tmp_path, engine, [])
    database = await open_database_cipher(KeyStore(engine), process.driver.keyring)
    old = manifest("old")
    await RegistryStore(engine).put_manifest("a/old", old, "v1")
    await overwrite(engine, "a/old", database.seal(old.content, old.digest))
    report = await shred(process, "customer:a")
    assert report.manifests_unreadable == 1
    with pytest.raises(DataKeyUnavailableError):
        await (await process.store()).get_tagged_manifest("a/old", "v1")
