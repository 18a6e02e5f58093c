"""Owner key-encryption keys: sealing, caching, destruction and per-owner wraps."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.engine import create_engine, migrate
from moorage.db.key_store import KeyStore
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
from moorage.storage.encryption.keys import FileKeyring

SEGMENT = 1024


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'moorage.db'}")
    await migrate(engine)
    yield engine
    await engine.dispose()


def make_driver(tmp_path: Path, engine: AsyncEngine) -> EncryptedDriver:
    """An encrypting driver with owner keys; each call is a separate process."""
    keyring = FileKeyring(tmp_path / "keys")
    driver = EncryptedDriver(
        FilesystemDriver(tmp_path / "storage", fsync=False),
        keyring,
        segment_bytes=SEGMENT,
    )
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
