"""Registry bookkeeping that the HTTP API cannot observe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from moorage.db.engine import create_engine, migrate
from moorage.db.registry_store import RegistryStore
from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.registry import Registry


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
