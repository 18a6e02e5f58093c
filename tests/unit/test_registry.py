"""Registry bookkeeping and upload buffers that the HTTP API cannot observe."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from moorage.db.engine import create_engine, migrate
from moorage.db.registry_store import RegistryStore
from moorage.fsync import start_writeback, wait_for_writeback
from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.registry import UPLOAD_BLOCK_BYTES, Registry, _BlockSink


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_abandoned_sessions_keep_no_lock(tmp_path: Path) -> None:
    """Upload sessions that clients abandon leave no per-session lock behind."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'moorage.db'}")
    await migrate(engine)
    registry = Registry(
        RegistryStore(engine), FilesystemDriver(tmp_path / "storage"), 4096
    )
    try:
        for _ in range(5):
            upload = await registry.start_upload("acme/app")
            await registry.append("acme/app", upload.id, chunks(b"abc", b"def"))
        assert len(registry._upload_locks) == 0
    finally:
        await engine.dispose()


async def test_concurrent_chunked_uploads_store_their_own_bytes(
    tmp_path: Path,
) -> None:
    """Uploads that run at once in one process, each PATCH taking buffers that
    an earlier body gave back to the pool, store exactly their own bytes."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'moorage.db'}")
    await migrate(engine)
    registry = Registry(
        RegistryStore(engine), FilesystemDriver(tmp_path / "storage"), 4096
    )
    block = UPLOAD_BLOCK_BYTES
    # Parts of 2.5 blocks, sent in pieces that do not line up with the blocks.
    bodies = [os.urandom(5 * block // 2 * 3) for _ in range(4)]

    async def push(data: bytes) -> str:
        upload = await registry.start_upload("acme/app")
        part = 5 * block // 2
        for start in range(0, len(data), part):
            piece = data[start : start + part]
            pieces = [piece[i : i + 300_000] for i in range(0, len(piece), 300_000)]
            await registry.append("acme/app", upload.id, chunks(*pieces), start=start)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        await registry.finish_upload("acme/app", upload.id, digest, None)
        return digest

    try:
        digests = await asyncio.gather(*(push(data) for data in bodies))
        assert _BlockSink._spare, "no buffer went back to the pool"
        for digest, data in zip(digests, bodies, strict=True):
            stream = await registry.read_blob(digest, 0, len(data))
            stored = b"".join([bytes(piece) async for piece in stream])
            assert stored == data
    finally:
        registry.store.close()
        await engine.dispose()


def test_writeback_starts_on_a_written_file(tmp_path: Path) -> None:
    """On Linux, writeback of a written range starts. A bad descriptor or an
    empty range starts nothing and raises nothing."""
    path = tmp_path / "data"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, os.urandom(1024 * 1024))
        assert start_writeback(descriptor, 0, 1024 * 1024) is (sys.platform == "linux")
        assert start_writeback(descriptor, 0, 0) is False
        assert wait_for_writeback(descriptor, 0, 1024 * 1024) is (
            sys.platform == "linux"
        )
        assert wait_for_writeback(descriptor, 0, 0) is False
    finally:
        os.close(descriptor)
    assert start_writeback(descriptor, 0, 1024) is False
    assert wait_for_writeback(descriptor, 0, 1024) is False


async def test_repeated_digest_leaves_no_upload_data(tmp_path: Path) -> None:
    """A second upload of a stored digest keeps the stored blob and leaves its
    own data neither under uploads/ nor in trash/ once the background delete ran."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'moorage.db'}")
    await migrate(engine)
    storage = tmp_path / "storage"
    registry = Registry(RegistryStore(engine), FilesystemDriver(storage), 4096)
    data = os.urandom(3 * UPLOAD_BLOCK_BYTES + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        for repository in ("acme/app", "acme/other"):
            upload = await registry.start_upload(repository)
            await registry.append(repository, upload.id, chunks(data))
            size = await registry.finish_upload(repository, upload.id, digest, None)
            assert size == len(data)
        await registry.wait_for_trash()

        assert list((storage / "uploads").iterdir()) == []
        assert list((storage / "trash").iterdir()) == []
        for repository in ("acme/app", "acme/other"):
            assert await registry.blob_size(repository, digest) == len(data)
        stream = await registry.read_blob(digest, 0, len(data))
        assert b"".join([bytes(piece) async for piece in stream]) == data
    finally:
        registry.store.close()
        await engine.dispose()


async def test_empty_trash_deletes_leftovers(tmp_path: Path) -> None:
    """Upload data that a stopped process left in trash/ is deleted, and an
    empty or missing trash/ counts zero."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'moorage.db'}")
    await migrate(engine)
    storage = tmp_path / "storage"
    registry = Registry(RegistryStore(engine), FilesystemDriver(storage), 4096)
    try:
        assert await registry.empty_trash() == 0
        (storage / "trash").mkdir(parents=True)
        for name in ("one", "two"):
            (storage / "trash" / name).write_bytes(os.urandom(2 * UPLOAD_BLOCK_BYTES))

        assert await registry.empty_trash() == 2

        assert list((storage / "trash").iterdir()) == []
        assert await registry.empty_trash() == 0
    finally:
        registry.store.close()
        await engine.dispose()
