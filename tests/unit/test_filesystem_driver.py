"""Reads of the filesystem driver: ranges across chunks, and early closes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from moorage.storage.drivers.filesystem import READ_CHUNK_BYTES, FilesystemDriver

SIZE = 3 * READ_CHUNK_BYTES + 12_345


@pytest.fixture
async def stored(tmp_path: Path) -> tuple[FilesystemDriver, bytes]:
    driver = FilesystemDriver(tmp_path / "storage", fsync=False)
    data = os.urandom(SIZE)
    await driver.put("blobs/data", data)
    return driver, data


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, None),
        (1, None),
        (READ_CHUNK_BYTES - 1, 2),
        (READ_CHUNK_BYTES, READ_CHUNK_BYTES),
        (5, 2 * READ_CHUNK_BYTES + 7),
        (SIZE - 10, None),
        (SIZE, None),
    ],
)
async def test_read_range(
    stored: tuple[FilesystemDriver, bytes], offset: int, length: int | None
) -> None:
    driver, data = stored
    chunks = [chunk async for chunk in driver.read("blobs/data", offset, length)]
    end = SIZE if length is None else offset + length
    assert b"".join(chunks) == data[offset:end]
    assert all(len(chunk) <= READ_CHUNK_BYTES for chunk in chunks)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_read_closed_early_closes_file(
    stored: tuple[FilesystemDriver, bytes],
) -> None:
    """A reader that stops after the first chunk, while the next one is being
    read ahead, leaves no descriptor open once that read has finished."""
    driver, data = stored
    before = _open_descriptors()
    for _ in range(20):
        stream = driver.read("blobs/data")
        first = await anext(stream)
        assert first == data[: len(first)]
        await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(100):
        if _open_descriptors() <= before:
            break
        await asyncio.sleep(0.01)
    assert _open_descriptors() <= before


async def test_check_missing_root(tmp_path: Path) -> None:
    """The readiness check fails when the root has been moved away or replaced
    by a file, and passes again once it is back."""
    root = tmp_path / "storage"
    driver = FilesystemDriver(root, fsync=False)
    await driver.check()
    root.rename(tmp_path / "storage.off")
    with pytest.raises(FileNotFoundError):
        await driver.check()
    root.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        await driver.check()
    root.unlink()
    (tmp_path / "storage.off").rename(root)
    await driver.check()
