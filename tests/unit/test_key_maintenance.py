"""Key rotation, re-encryption and encryption of plaintext objects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.encryption import maintenance
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.keys import (
    EnvKeyring,
    FileKeyring,
    KeyUnavailableError,
    generate_key_text,
)

SEGMENT = 1024


def make_driver(root: Path, keyring: FileKeyring | EnvKeyring) -> EncryptedDriver:
    return EncryptedDriver(
        FilesystemDriver(root / "storage", fsync=False), keyring, segment_bytes=SEGMENT
    )


async def load(driver: EncryptedDriver, path: str) -> bytes:
    return b"".join([chunk async for chunk in driver.read(path)])


async def fill(driver: EncryptedDriver, count: int) -> dict[str, bytes]:
    stored = {}
    for index in range(count):
        data = os.urandom(index * 700)
        await driver.put(f"blobs/{index:03}", data)
        stored[f"blobs/{index:03}"] = data
    return stored


async def test_rotate_leaves_only_the_new_key(tmp_path: Path) -> None:
    """After rotation every object reads with only the new key on disk."""
    driver = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    stored = await fill(driver, 6)
    old = driver.keyring.active().key_id
    report = await maintenance.rotate(driver)
    assert report.rewrapped == 6
    fresh = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    assert fresh.keyring.key_ids() == [fresh.keyring.active().key_id]
    assert fresh.keyring.active().key_id != old
    for path, data in stored.items():
        assert await load(fresh, path) == data
    usage = await maintenance.key_usage(fresh)
    assert usage.envelopes == {fresh.keyring.active().key_id: 6}
    assert usage.key_ids() == {fresh.keyring.active().key_id}


async def test_rotate_keeps_data_untouched(tmp_path: Path) -> None:
    """Rotation rewrites envelopes only: the stored ciphertext stays byte-identical."""
    driver = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    await fill(driver, 3)
    before = {p: p.read_bytes() for p in (tmp_path / "storage" / "blobs").iterdir()}
    await maintenance.rotate(driver, retire=False)
    assert before == {p: p.read_bytes() for p in before}


async def test_retired_key_is_needed_without_rotation(tmp_path: Path) -> None:
    """A key deleted before its data keys were rewrapped takes its data with it."""
    keyring = FileKeyring(tmp_path / "keys")
    driver = make_driver(tmp_path, keyring)
    await driver.put("blobs/a", b"secret")
    old = keyring.active().key_id
    keyring.create()
    keyring.retire(old)
    fresh = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    with pytest.raises(KeyUnavailableError):
        await load(fresh, "blobs/a")


async def test_env_keys_rotate_to_the_current_key(tmp_path: Path) -> None:
    """With keys from the environment, rotation rewraps from the previous key."""
    first, second = generate_key_text(), generate_key_text()
    driver = make_driver(tmp_path, EnvKeyring(first, []))
    stored = await fill(driver, 3)
    rotated = make_driver(tmp_path, EnvKeyring(second, [first]))
    await maintenance.rotate(rotated, new_key=False, retire=False)
    only_new = make_driver(tmp_path, EnvKeyring(second, []))
    for path, data in stored.items():
        assert await load(only_new, path) == data


async def test_reencrypt_gives_new_data_keys(tmp_path: Path) -> None:
    """Re-encryption rewrites each object under a new object id; contents stay."""
    driver = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    stored = await fill(driver, 4)
    before = {path: await driver.read_header(path) for path in stored}
    assert (await maintenance.reencrypt_all(driver, "blobs")).reencrypted == 4
    for path, data in stored.items():
        assert await load(driver, path) == data
        assert await driver.read_header(path) != before[path]
    assert len(await maintenance.envelope_paths(driver)) == 4


async def test_reencrypt_resumes_after_the_last_object(tmp_path: Path) -> None:
    """A run that stopped part way continues after the last object it finished."""
    driver = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    await fill(driver, 5)
    await maintenance._save_state(driver, {"prefix": "blobs", "last": "blobs/002"})
    assert (await maintenance.reencrypt_all(driver, "blobs")).reencrypted == 2
    assert (await maintenance.reencrypt_all(driver, "blobs")).reencrypted == 5


async def test_plaintext_objects_are_encrypted(tmp_path: Path) -> None:
    """Objects stored before encryption was on are converted and read the same."""
    driver = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    data = b"MARKER-old-plaintext" * 500
    await driver.inner.put("blobs/old", data)
    await driver.put("blobs/new", b"already encrypted")
    assert await maintenance.encrypt_plaintext(driver, "blobs") == 1
    assert b"MARKER-old-plaintext" not in (tmp_path / "storage/blobs/old").read_bytes()
    assert await load(driver, "blobs/old") == data


@pytest.mark.parametrize("count", [0, 3])
async def test_progress_reports_total_first(tmp_path: Path, count: int) -> None:
    """Each long task reports its total before the first object, and also when
    there is nothing to do, so a progress bar never shows an unknown total."""
    driver = make_driver(tmp_path, FileKeyring(tmp_path / "keys"))
    await fill(driver, count)
    tasks = {
        "rewrap": lambda report: maintenance.rewrap_all(driver, report),
        "reencrypt": lambda report: maintenance.reencrypt_all(driver, "blobs/", report),
        "encrypt plaintext": lambda report: maintenance.encrypt_plaintext(
            driver, "blobs/", report
        ),
    }
    for name, task in tasks.items():
        calls: list[tuple[int, int]] = []
        await task(lambda done, total, calls=calls: calls.append((done, total)))
        assert calls[0] == (0, count), name
        assert calls[-1] == (count, count), name
