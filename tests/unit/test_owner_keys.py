"""Owner key-encryption keys: sealing, caching, destruction and per-owner wraps."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.engine import create_engine, migrate
from moorage.db.key_store import KeyStore
from moorage.db.schema import data_key_wraps, sealed_keys, shredded_objects
from moorage.db.wrap_store import WrapStore
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
from moorage.storage.encryption.format import IntegrityError
from moorage.storage.encryption.keys import FileKeyring
from tests.support.database import create_database, drop_database

SEGMENT = 1024


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
