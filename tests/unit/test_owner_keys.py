"""Owner key-encryption keys: sealing, caching, destruction and per-owner wraps."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from moorage.db import wrap_store
from moorage.db.engine import create_engine, migrate
from moorage.db.key_store import KeyStore
from moorage.db.schema import (
    blobs,
    data_key_wraps,
    object_paths,
    repositories,
    repository_blobs,
    sealed_keys,
    shredded_objects,
)
from moorage.db.wrap_store import WrapStore
from moorage.digests import parse_digest
from moorage.storage import paths
from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.encryption import maintenance
from moorage.storage.encryption.custody import (
    DataKeyCustody,
    DataKeyUnavailableError,
    OwnerKeys,
    wrapping_for,
)
from moorage.storage.encryption.database import rewrap_database_keys
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.format import IntegrityError, MisplacedObjectError
from moorage.storage.encryption.keys import FileKeyring
from tests.support.database import backend, create_database, drop_database

SEGMENT = 1024
# How long a call must stay blocked to count as waiting for a lock.
BLOCKED_SECONDS = 0.5


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated database of the backend under test (docs/testing.md)."""
    url = create_database(tmp_path)
    engine = create_engine(url)
    await migrate(engine)
    yield engine
    await engine.dispose()
    drop_database(url)


def make_driver(
    tmp_path: Path,
    engine: AsyncEngine,
    integrity_errors: list[IntegrityError] | None = None,
) -> EncryptedDriver:
    """An encrypting driver with owner keys; each call is a separate process.

    With `integrity_errors`, the driver's integrity hook appends to that list.
    """
    keyring = FileKeyring(tmp_path / "keys")
    driver = EncryptedDriver(
        FilesystemDriver(tmp_path / "storage", fsync=False),
        keyring,
        segment_bytes=SEGMENT,
    )
    if integrity_errors is not None:
        driver.on_integrity_error = integrity_errors.append
    driver.custody = DataKeyCustody(
        OwnerKeys(KeyStore(engine), keyring), WrapStore(engine)
    )
    return driver


async def load(driver: EncryptedDriver, path: str) -> bytes:
    return b"".join([chunk async for chunk in driver.read(path)])


async def test_objects_need_one_owner_key(tmp_path: Path, engine: AsyncEngine) -> None:
    """An object wrapped for two owners reads with either key alone."""
    driver = make_driver(tmp_path, engine)
    data = os.urandom(5 * SEGMENT + 7)
    with wrapping_for(["customer:a", "customer:b"]):
        await driver.put("blobs/x", data)
    assert not (tmp_path / "storage" / ".keys").exists()
    await maintenance.shred_owner(driver, "customer:a")
    assert await load(make_driver(tmp_path, engine), "blobs/x") == data
    await maintenance.shred_owner(driver, "customer:b")
    with pytest.raises(DataKeyUnavailableError):
        await load(make_driver(tmp_path, engine), "blobs/x")


async def test_shred_report_counts_sole_objects(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """Only objects whose single wrap is the owner's count as made unreadable."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await driver.put("blobs/own", b"own")
    with wrapping_for(["customer:a", "vendor"]):
        await driver.put("blobs/shared", b"shared")
    report = await maintenance.shred_owner(driver, "customer:a")
    assert report.key_destroyed
    assert report.wraps_deleted == 2
    assert report.objects_unreadable == 1
    again = await maintenance.shred_owner(driver, "customer:a")
    assert not again.key_destroyed


async def test_recreated_owner_key_is_not_used_stale(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """A process that cached an owner key, destroyed and made again by another
    process, wraps new objects under the new key, so they stay readable."""
    server = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await server.put("blobs/old", b"old")
    await maintenance.shred_owner(make_driver(tmp_path, engine), "customer:a")
    with wrapping_for(["customer:a"]):
        await server.put("blobs/new", b"new")
    assert await load(make_driver(tmp_path, engine), "blobs/new") == b"new"
    other = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await other.put("blobs/newer", b"newer")
    # The first process still has the key it made in its cache. It reads the
    # other process's object after reloading the key.
    assert await load(server, "blobs/newer") == b"newer"


async def test_rotation_rewraps_owner_keys(tmp_path: Path, engine: AsyncEngine) -> None:
    """Rotating the installation key rewraps owner keys; objects stay readable
    with only the new installation key on disk."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await driver.put("blobs/x", b"data")
    old = driver.keyring.active().key_id
    driver.keyring.create()
    assert await rewrap_database_keys(KeyStore(engine), driver.keyring) == 1
    driver.keyring.retire(old)
    assert await load(make_driver(tmp_path, engine), "blobs/x") == b"data"


async def test_objects_without_owners_use_envelopes(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """Outside any owner's context the data key goes to an installation envelope."""
    driver = make_driver(tmp_path, engine)
    await driver.put("blobs/orphan", b"orphan")
    assert list((tmp_path / "storage" / ".keys").rglob("*"))
    assert await load(make_driver(tmp_path, engine), "blobs/orphan") == b"orphan"


async def object_id_of(driver: EncryptedDriver, path: str) -> str:
    header = await driver.read_header(path)
    assert header is not None
    return header.object_id.hex()


async def test_shredding_records_unreadable_objects(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """Shredding records the objects it leaves without a wrap, and only those;
    reading one is a data-key-unavailable error, not an integrity report."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await driver.put("blobs/own", b"own")
    with wrapping_for(["customer:a", "vendor"]):
        await driver.put("blobs/shared", b"shared")
    await maintenance.shred_owner(driver, "customer:a")

    async with engine.connect() as connection:
        rows = (await connection.execute(select(shredded_objects))).all()
    assert [(row.object_id, row.owner) for row in rows] == [
        (await object_id_of(driver, "blobs/own"), "customer:a")
    ]
    errors: list[IntegrityError] = []
    with pytest.raises(DataKeyUnavailableError, match="shredded"):
        await load(make_driver(tmp_path, engine, errors), "blobs/own")
    assert errors == []
    assert await load(make_driver(tmp_path, engine), "blobs/shared") == b"shared"


async def test_lost_wraps_are_an_integrity_error(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """An object whose wraps vanished without shredding is reported as damage."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await driver.put("blobs/x", b"data")
    async with engine.begin() as connection:
        await connection.execute(delete(data_key_wraps))

    errors: list[IntegrityError] = []
    with pytest.raises(IntegrityError, match="wraps were lost") as raised:
        await load(make_driver(tmp_path, engine, errors), "blobs/x")
    assert not isinstance(raised.value, DataKeyUnavailableError)
    assert errors == [raised.value]


async def test_lost_owner_key_is_an_integrity_error(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """Wraps whose owner key vanished without shredding are reported as damage."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await driver.put("blobs/x", b"data")
    async with engine.begin() as connection:
        await connection.execute(delete(sealed_keys))

    errors: list[IntegrityError] = []
    with pytest.raises(IntegrityError, match="not shredded") as raised:
        await load(make_driver(tmp_path, engine, errors), "blobs/x")
    assert not isinstance(raised.value, DataKeyUnavailableError)
    assert errors == [raised.value]


async def test_deleting_an_object_forgets_its_shredding(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """A shredded object's record goes when the object is deleted."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["customer:a"]):
        await driver.put("blobs/x", b"data")
    await maintenance.shred_owner(driver, "customer:a")
    await driver.delete("blobs/x")
    async with engine.connect() as connection:
        assert (await connection.execute(select(shredded_objects))).all() == []


def copy_file(tmp_path: Path, source: str, target: str) -> None:
    storage = tmp_path / "storage"
    (storage / target).parent.mkdir(parents=True, exist_ok=True)
    (storage / target).write_bytes((storage / source).read_bytes())


@pytest.mark.parametrize("owners", [["customer:a"], []])
async def test_copied_object_is_misplaced(
    tmp_path: Path, engine: AsyncEngine, owners: list[str]
) -> None:
    """An object's file copied over another object's path, with owner wraps
    or with an installation envelope, does not open there, and deleting the
    copy keeps the original readable."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(owners):
        await driver.put("blobs/a", b"a's content")
        await driver.put("blobs/b", b"b's content")
    copy_file(tmp_path, "blobs/a", "blobs/b")

    errors: list[IntegrityError] = []
    reader = make_driver(tmp_path, engine, errors)
    with pytest.raises(MisplacedObjectError, match="belongs at blobs/a") as raised:
        await load(reader, "blobs/b")
    assert errors == [raised.value]
    with pytest.raises(MisplacedObjectError):
        await reader.open_reader("blobs/b", 3, 4)

    await driver.delete("blobs/b")
    assert await load(make_driver(tmp_path, engine), "blobs/a") == b"a's content"


async def test_moved_object_opens_at_its_new_path(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """`move` carries an object's recorded path; its old path is free again."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["vendor"]):
        writer = await driver.writer("uploads/u/data")
        await writer.write(b"uploaded")
        await writer.commit()
    await driver.move("uploads/u/data", "blobs/u")
    assert await load(make_driver(tmp_path, engine), "blobs/u") == b"uploaded"
    copy_file(tmp_path, "blobs/u", "uploads/u/data")
    with pytest.raises(MisplacedObjectError, match="belongs at blobs/u"):
        await load(make_driver(tmp_path, engine), "uploads/u/data")


async def test_unrecorded_objects_get_paths(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """Objects stored before paths were recorded open where nothing else is
    recorded, and `record_object_paths` records them, skipping copies."""
    driver = make_driver(tmp_path, engine)
    old = paths.blob_path(parse_digest("sha256:" + hashlib.sha256(b"old").hexdigest()))
    new = paths.blob_path(parse_digest("sha256:" + hashlib.sha256(b"new").hexdigest()))
    copy = paths.blob_path(parse_digest("sha256:" + "0" * 64))
    with wrapping_for(["vendor"]):
        await driver.put(old, b"old")
        await driver.put(new, b"new")
    async with engine.begin() as connection:
        await connection.execute(delete(object_paths))
    copy_file(tmp_path, old, copy)
    assert await load(make_driver(tmp_path, engine), old) == b"old"

    assert await maintenance.record_object_paths(driver) == 2
    assert await maintenance.record_object_paths(driver) == 0
    async with engine.connect() as connection:
        recorded = {row.path for row in await connection.execute(select(object_paths))}
    assert recorded == {old, new}
    with pytest.raises(MisplacedObjectError):
        await load(make_driver(tmp_path, engine), copy)
    assert await load(make_driver(tmp_path, engine), old) == b"old"


async def test_reencrypted_object_opens_in_place(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """Re-encryption records the new object at the path it replaces."""
    driver = make_driver(tmp_path, engine)
    with wrapping_for(["vendor"]):
        await driver.put("blobs/r", b"re-encrypted")
    old_id = await object_id_of(driver, "blobs/r")
    report = await maintenance.reencrypt_all(driver, "blobs")
    assert report.reencrypted == 1
    assert await object_id_of(driver, "blobs/r") != old_id
    assert await load(make_driver(tmp_path, engine), "blobs/r") == b"re-encrypted"
    async with engine.connect() as connection:
        rows = (await connection.execute(select(object_paths))).all()
    assert [row.path for row in rows] == ["blobs/r"]


async def store_blob(
    driver: EncryptedDriver, engine: AsyncEngine, data: bytes, owners: list[str]
) -> tuple[str, str]:
    """Store a committed blob wrapped for `owners`; return its digest and object id."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = paths.blob_path(parse_digest(digest))
    with wrapping_for(owners):
        await driver.put(path, data)
    async with engine.begin() as connection:
        await connection.execute(insert(blobs).values(digest=digest, size=len(data)))
    return digest, await object_id_of(driver, path)


async def link(connection: AsyncConnection, repository: str, digest: str) -> None:
    """Link a blob into a repository of the vendor's namespace `products`."""
    result = await connection.execute(
        insert(repositories).values(name=repository, namespace="products")
    )
    repository_id = result.inserted_primary_key[0]
    await connection.execute(
        insert(repository_blobs).values(repository_id=repository_id, digest=digest)
    )


async def wrap_owners(engine: AsyncEngine, object_id: str) -> set[str]:
    async with engine.connect() as connection:
        result = await connection.scalars(
            select(data_key_wraps.c.owner).where(
                data_key_wraps.c.object_id == object_id
            )
        )
        return set(result)


async def test_claim_skips_a_copied_blob(tmp_path: Path, engine: AsyncEngine) -> None:
    """Claiming blobs for an owner reports a blob file that is a copy of
    another owner's blob, and wraps that blob's data key for no other owner."""
    errors: list[IntegrityError] = []
    driver = make_driver(tmp_path, engine, errors)
    private, private_id = await store_blob(driver, engine, b"private", ["customer:a"])
    copied, _ = await store_blob(driver, engine, b"copied", ["customer:a"])
    async with engine.begin() as connection:
        await link(connection, "products/copied", copied)
    copy_file(
        tmp_path,
        paths.blob_path(parse_digest(private)),
        paths.blob_path(parse_digest(copied)),
    )
    assert await maintenance.claim_blobs(driver, "vendor") == 0
    assert await wrap_owners(engine, private_id) == {"customer:a"}
    assert len(errors) == 1
    assert isinstance(errors[0], MisplacedObjectError)


async def test_release_waits_for_locked_link(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """A release that starts while a link of the same blob holds the object's
    lock sees that link once it commits, and keeps the owner's wrap."""
    driver = make_driver(tmp_path, engine)
    digest, object_id = await store_blob(
        driver, engine, b"layer", ["vendor", "customer:a"]
    )
    store = WrapStore(engine)
    async with engine.connect() as other:
        transaction = await other.begin()
        await wrap_store._lock_object(other, object_id)
        await link(other, "products/app", digest)
        release = asyncio.create_task(store.release(object_id, "vendor", digest))
        await asyncio.sleep(BLOCKED_SECONDS)
        assert not release.done()
        await transaction.commit()
    assert await release is False
    assert await wrap_owners(engine, object_id) == {"vendor", "customer:a"}


@pytest.mark.skipif(
    backend() != "postgresql",
    reason="on SQLite a release holds the write lock, so no link commits during it",
)
async def test_link_check_waits_for_release(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    """The wrap check after a link waits for a release that holds the object's
    lock, and adds the owner's wrap again when that release deleted it."""
    driver = make_driver(tmp_path, engine)
    digest, object_id = await store_blob(
        driver, engine, b"layer", ["vendor", "customer:a"]
    )
    async with engine.begin() as connection:
        await link(connection, "products/app", digest)
    path = paths.blob_path(parse_digest(digest))
    async with engine.connect() as other:
        transaction = await other.begin()
        await wrap_store._lock_object(other, object_id)
        await other.execute(
            delete(data_key_wraps).where(
                data_key_wraps.c.object_id == object_id,
                data_key_wraps.c.owner == "vendor",
            )
        )
        share = asyncio.create_task(driver.share(path, "vendor", digest))
        await asyncio.sleep(BLOCKED_SECONDS)
        assert not share.done()
        await transaction.commit()
    await share
    assert await wrap_owners(engine, object_id) == {"vendor", "customer:a"}
    assert await load(make_driver(tmp_path, engine), path) == b"layer"


@pytest.mark.skipif(
    backend() != "postgresql",
    reason="on SQLite shredding holds the write lock from its first statement",
)
async def test_shred_waits_for_release(tmp_path: Path, engine: AsyncEngine) -> None:
    """A release that counted two wraps holds them, so a shredding of the other
    owner waits and then records the object, whose last wrap it deleted."""
    driver = make_driver(tmp_path, engine)
    _, object_id = await store_blob(driver, engine, b"layer", ["vendor", "customer:a"])
    store = WrapStore(engine)
    async with engine.connect() as other:
        transaction = await other.begin()
        # What `release` holds after counting the wraps and before deleting one.
        await other.execute(
            select(data_key_wraps.c.owner)
            .where(data_key_wraps.c.object_id == object_id)
            .with_for_update()
        )
        shred = asyncio.create_task(store.shred("customer:a"))
        await asyncio.sleep(BLOCKED_SECONDS)
        assert not shred.done()
        await other.execute(
            delete(data_key_wraps).where(
                data_key_wraps.c.object_id == object_id,
                data_key_wraps.c.owner == "vendor",
            )
        )
        await transaction.commit()
    counts = await shred
    assert counts.objects_unreadable == 1
    assert await store.shredded(object_id)


async def test_add_missing_uses_one_connection(tmp_path: Path) -> None:
    """Adding a wrap works with a pool of one connection: the wraps are made
    before the transaction, not on a second connection while it waits."""
    url = create_database(tmp_path)
    engine = create_engine(url)
    await migrate(engine)
    await engine.dispose()
    one = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=2)
    try:
        store = WrapStore(one)
        object_id = "ab" * 16
        await store.add(object_id, [wrap_store.DataKeyWrap("vendor", b"v")])

        async def new_wraps() -> list[wrap_store.DataKeyWrap]:
            # As the driver does: read the object's wraps to open its data key.
            assert [wrap.owner for wrap in await store.wraps(object_id)] == ["vendor"]
            return [wrap_store.DataKeyWrap("customer:a", b"a")]

        assert await store.add_missing(object_id, "customer:a", new_wraps) is True
        assert await wrap_owners(one, object_id) == {"vendor", "customer:a"}
        assert await store.add_missing(object_id, "customer:a", new_wraps) is False
    finally:
        await one.dispose()
        drop_database(url)
