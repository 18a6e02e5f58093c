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
