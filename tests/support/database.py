"""The metadata database a test run uses: SQLite files, or throwaway PostgreSQL
databases on the local server (MOORAGE_TEST_DATABASE=postgresql)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

POSTGRES_DSN = os.environ.get(
    "MOORAGE_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432"
)


def backend() -> str:
    value = os.environ.get("MOORAGE_TEST_DATABASE", "sqlite")
    if value not in {"sqlite", "postgresql"}:
        raise ValueError(
            f"MOORAGE_TEST_DATABASE must be sqlite or postgresql, not {value}"
        )
    return value


def _psql(sql: str) -> None:
    host_part = POSTGRES_DSN.split("://", 1)[1]
    user, _, hostport = host_part.partition("@")
    host, _, port = hostport.partition(":")
    subprocess.run(
        [
            "psql",
            "-h",
            host,
            "-p",
            port or "5432",
            "-U",
            user,
            "-d",
            "postgres",
            "-qc",
            sql,
        ],
        check=True,
        capture_output=True,
    )


def create_database(data_dir: Path) -> str:
    """Return the URL of a new, empty metadata database."""
    if backend() == "sqlite":
        return f"sqlite+aiosqlite:///{data_dir / 'moorage.db'}"
    name = f"moorage_test_{uuid.uuid4().hex[:12]}"
    _psql(f'CREATE DATABASE "{name}"')
    return f"{POSTGRES_DSN}/{name}"


def drop_database(url: str) -> None:
    if url.startswith("postgresql"):
        name = url.rsplit("/", 1)[1]
        _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def copy_database(url: str, data_dir: Path) -> str:
    """Copy a metadata database that nothing is connected to; return the copy's
    URL. A SQLite copy goes to `data_dir`."""
    if url.startswith("postgresql"):
        name = url.rsplit("/", 1)[1]
        copy = f"moorage_test_{uuid.uuid4().hex[:12]}"
        _psql(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
        return f"{POSTGRES_DSN}/{copy}"
    source = Path(url.split(":///", 1)[1])
    target = data_dir / source.name
    for suffix in ("", "-wal", "-shm"):
        part = source.with_name(source.name + suffix)
        if part.exists():
            target.with_name(target.name + suffix).write_bytes(part.read_bytes())
    return f"sqlite+aiosqlite:///{target}"
