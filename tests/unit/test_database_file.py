"""The SQLite database file is readable by its owner only."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from moorage.db.engine import create_engine


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_database_file_owner_only(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'moorage.db'}")
    asyncio.run(engine.dispose())
    assert _mode(tmp_path / "moorage.db") == 0o600


def test_existing_database_file_restricted(tmp_path: Path) -> None:
    path = tmp_path / "moorage.db"
    path.touch()
    path.chmod(0o644)
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    asyncio.run(engine.dispose())
    assert _mode(path) == 0o600
