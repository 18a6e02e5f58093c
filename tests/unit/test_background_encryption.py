"""The background conversion of plaintext blobs on a server with encryption on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moorage.db.engine import create_engine, migrate
from moorage.db.registry_store import RegistryStore
from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.encryption import background
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.keys import FileKeyring


async def test_conversion_waits_for_plaintext_uploads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plaintext upload that finishes later is encrypted by a later pass."""
    monkeypatch.setattr(background, "RECHECK_SECONDS", 0.05)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'moorage.db'}")
    await migrate(engine)
    plain = FilesystemDriver(tmp_path / "storage", fsync=False)
    driver = EncryptedDriver(plain, FileKeyring(tmp_path / "keys"))
    await plain.put("blobs/sha256/aa/aa01", b"old blob")
    await plain.put("uploads/u1/data", b"upload begun before encryption")

    task = background.start_background_encryption(driver, RegistryStore(engine))
    assert task is not None
    # Poll instead of sleeping a fixed time: on a loaded machine the first
    # pass can take longer than any fixed sleep.
    for _ in range(200):
        if await driver.read_header("blobs/sha256/aa/aa01") is not None:
            break
        await asyncio.sleep(0.05)
    assert await driver.read_header("blobs/sha256/aa/aa01") is not None
    assert not task.done()

    await plain.move("uploads/u1/data", "blobs/sha256/bb/bb01")
    await plain.delete("uploads/u1")
    await asyncio.wait_for(task, 5)
    assert await driver.read_header("blobs/sha256/bb/bb01") is not None
    chunks = [chunk async for chunk in driver.read("blobs/sha256/bb/bb01")]
    assert b"".join(chunks) == b"upload begun before encryption"
    await engine.dispose()
