"""The filesystem driver keeps every key inside its root directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from moorage.storage.drivers.filesystem import FilesystemDriver


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a/../..", ".."])
async def test_filesystem_key_outside_root_rejected(tmp_path: Path, key: str) -> None:
    """A key that leads out of the root raises ValueError before any file access."""
    driver = FilesystemDriver(tmp_path / "root")
    with pytest.raises(ValueError, match="escapes the root"):
        await driver.put(key, b"data")
    assert not (tmp_path / "x").exists()


async def test_filesystem_key_inside_root_stored(tmp_path: Path) -> None:
    """A nested key, even one with `..` that stays inside, is stored under the root."""
    driver = FilesystemDriver(tmp_path / "root")
    await driver.put("blobs/../blobs/sha256/ab/abc", b"data")
    assert (tmp_path / "root/blobs/sha256/ab/abc").read_bytes() == b"data"
    assert await driver.list("blobs") == ["blobs/sha256/ab/abc"]
