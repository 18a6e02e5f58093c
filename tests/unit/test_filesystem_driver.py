"""The filesystem driver: reads across chunks, early closes, O_DIRECT writes."""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
from pathlib import Path

import pytest

from moorage.storage.drivers import filesystem
from moorage.storage.drivers.base import PathNotFoundError
from moorage.storage.drivers.filesystem import (
    READ_CHUNK_BYTES,
    WRITE_BUFFER_BYTES,
    FilesystemDriver,
    _completed_ranges,
    _open_direct,
    _write_block,
)

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


def _direct_supported(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"")
    descriptor = _open_direct(str(probe))
    if descriptor is None:
        return False
    os.close(descriptor)
    return True


def _aligned_block(size: int) -> mmap.mmap:
    block = mmap.mmap(-1, size)
    block.write(os.urandom(size))
    return block


def test_write_block_direct_only_when_aligned(tmp_path: Path) -> None:
    """A page-aligned block at an aligned offset goes with O_DIRECT; bytes
    objects, unaligned offsets and unaligned lengths through the page cache."""
    if not _direct_supported(tmp_path):
        pytest.skip("the filesystem of tmp_path refuses O_DIRECT")
    path = tmp_path / "file"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    direct = _open_direct(str(path))
    assert direct is not None
    block = _aligned_block(WRITE_BUFFER_BYTES)
    view = memoryview(block)
    try:
        assert _write_block(descriptor, direct, view, 0) == "direct"
        assert _write_block(descriptor, direct, bytes(view), 0) == "buffered"
        assert _write_block(descriptor, direct, view, 100) == "buffered"
        assert _write_block(descriptor, direct, view[:-1], 0) == "buffered"
        assert _write_block(descriptor, None, view, 0) == "buffered"
    finally:
        os.close(direct)
        os.close(descriptor)


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
async def test_mixed_writes_read_back(tmp_path: Path, where: str) -> None:
    """Blocks written with O_DIRECT, through the page cache and after reopening
    at an unaligned offset make up the file in order, on a filesystem with
    O_DIRECT and on tmpfs, where it may be refused."""
    root = tmp_path if where == "tmp_path" else Path(where)
    if not root.is_dir():
        pytest.skip(f"no {where}")
    driver = FilesystemDriver(root / f"storage-{os.getpid()}-{id(tmp_path)}")
    try:
        first = _aligned_block(2 * WRITE_BUFFER_BYTES)
        tail = os.urandom(WRITE_BUFFER_BYTES + 5)
        later = _aligned_block(WRITE_BUFFER_BYTES)
        writer = await driver.writer("uploads/x/data")
        await writer.write(memoryview(first)[:WRITE_BUFFER_BYTES])
        await writer.write(memoryview(first)[WRITE_BUFFER_BYTES:])
        await writer.write(tail)
        await writer.write(b"small")
        assert await writer.commit(sync=False) == 3 * WRITE_BUFFER_BYTES + 10
        writer = await driver.writer("uploads/x/data", 3 * WRITE_BUFFER_BYTES + 10)
        await writer.write(memoryview(later))
        size = await writer.commit()
        expected = bytes(first) + tail + b"small" + bytes(later)
        assert size == len(expected)
        stored = b"".join([c async for c in driver.read("uploads/x/data")])
        assert stored == expected
        # A cancelled writer leaves the file as it was.
        writer = await driver.writer("uploads/x/data", size)
        await writer.write(memoryview(later))
        await writer.cancel()
        assert (await driver.stat("uploads/x/data")).size == size
    finally:
        await driver.delete("uploads")
        shutil.rmtree(driver.root, ignore_errors=True)


async def test_stored_files_private(tmp_path: Path) -> None:
    """Objects written whole or through a writer are readable by their owner
    only, even with an umask that allows more."""
    driver = FilesystemDriver(tmp_path / "storage", fsync=False)
    previous = os.umask(0)
    try:
        await driver.put("blobs/whole", b"whole")
        writer = await driver.writer("uploads/session/data")
        await writer.write(b"chunk")
        await writer.commit()
    finally:
        os.umask(previous)
    for name in ("blobs/whole", "uploads/session/data"):
        assert (tmp_path / "storage" / name).stat().st_mode & 0o777 == 0o600


async def test_early_writeback_keeps_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file written back early every two blocks, from a writer that started
    at offset 0 and from one that resumed later, reads back whole."""
    monkeypatch.setattr(filesystem, "EARLY_SYNC_BYTES", 2 * WRITE_BUFFER_BYTES)
    driver = FilesystemDriver(tmp_path / "storage")
    blocks = [os.urandom(WRITE_BUFFER_BYTES) for _ in range(9)]
    writer = await driver.writer("uploads/x/data")
    for block in blocks[:5]:
        await writer.write(block)
    first = await writer.commit(sync=False)
    writer = await driver.writer("uploads/x/data", first)
    for block in blocks[5:]:
        await writer.write(block)
    size = await writer.commit()

    assert size == 9 * WRITE_BUFFER_BYTES
    stored = b"".join([c async for c in driver.read("uploads/x/data")])
    assert stored == b"".join(blocks)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, 0, None),
        (0, 31, None),
        (0, 32, (0, 32)),
        (8, 32, (0, 32)),
        (24, 40, (0, 32)),
        (32, 64, (32, 32)),
        (33, 63, None),
        (40, 100, (32, 64)),
    ],
)
def test_completed_ranges(
    monkeypatch: pytest.MonkeyPatch,
    start: int,
    end: int,
    expected: tuple[int, int] | None,
) -> None:
    """A chunk's commit writes back the aligned ranges it completed, from the
    start of the range it began in."""
    monkeypatch.setattr(filesystem, "EARLY_SYNC_BYTES", 32)
    assert _completed_ranges(start, end) == expected


async def test_chunk_commits_write_back_completed_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of one block each start writeback on every second commit, for
    the two blocks that commit completed, and the file reads back whole."""
    monkeypatch.setattr(filesystem, "EARLY_SYNC_BYTES", 2 * WRITE_BUFFER_BYTES)
    started: list[tuple[int, int]] = []
    real_start_writeback = filesystem.start_writeback

    def recording_start_writeback(fd: int, offset: int, length: int) -> bool:
        started.append((offset, length))
        return real_start_writeback(fd, offset, length)

    monkeypatch.setattr(filesystem, "start_writeback", recording_start_writeback)
    driver = FilesystemDriver(tmp_path / "storage")
    blocks = [os.urandom(WRITE_BUFFER_BYTES) for _ in range(5)]
    size = 0
    for block in blocks:
        writer = await driver.writer("uploads/x/data", size)
        await writer.write(block)
        size = await writer.commit(sync=False)

    pair = 2 * WRITE_BUFFER_BYTES
    assert started == [(0, pair), (pair, pair)]
    stored = b"".join([c async for c in driver.read("uploads/x/data")])
    assert stored == b"".join(blocks)


async def test_writer_cuts_bytes_past_offset(tmp_path: Path) -> None:
    """A writer reopened at an offset drops what the file contains past it,
    keeps what comes before, and appends after it."""
    driver = FilesystemDriver(tmp_path / "storage", fsync=False)
    writer = await driver.writer("uploads/x/data")
    await writer.write(b"kept-dropped")
    assert await writer.commit() == 12

    writer = await driver.writer("uploads/x/data", 4)
    assert (await driver.stat("uploads/x/data")).size == 4
    await writer.write(b"+new")
    assert await writer.commit() == 8
    writer = await driver.writer("uploads/x/data", 8)
    assert await writer.commit() == 8

    stored = b"".join([c async for c in driver.read("uploads/x/data")])
    assert stored == b"kept+new"


async def test_writer_at_offset_needs_the_file(tmp_path: Path) -> None:
    """Reopening a missing key at an offset raises PathNotFoundError."""
    driver = FilesystemDriver(tmp_path / "storage", fsync=False)
    with pytest.raises(PathNotFoundError):
        await driver.writer("uploads/missing/data", 10)
