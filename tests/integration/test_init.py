"""`moorage init`: the first start's set-up, without serving."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.database import create_database, drop_database
from tests.support.server import ServerProcess

PASSWORD_LINE = re.compile(r"login: admin  password: (\S+)")


def _init(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    env = server.environment()
    del env["MOORAGE_ADMIN_PASSWORD"]
    return subprocess.run(
        [sys.executable, "-m", "moorage", "init"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_init_then_serve(tmp_path: Path) -> None:
    """init creates the admin and prints its password once; a second init prints
    none; the server started afterwards takes that password."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    try:
        first = _init(server)
        assert first.returncode == 0, first.stderr
        found = PASSWORD_LINE.search(first.stdout)
        assert found is not None, first.stdout
        assert "is ready" in first.stdout

        second = _init(server)
        assert second.returncode == 0, second.stderr
        assert "password" not in second.stdout
        assert "is ready" in second.stdout

        server.start()
        token = httpx.get(
            f"{server.url}/token",
            params={"service": "moorage"},
            auth=("admin", found.group(1)),
        )
        assert token.status_code == 200, token.text
        assert "password:" not in server.log()
    finally:
        server.stop()
        drop_database(server.database_url)


def test_init_unreachable_database(tmp_path: Path) -> None:
    """An unreachable database is one error line and exit status 1."""
    data_dir = tmp_path / "data"
    server = ServerProcess(
        data_dir=data_dir,
        database_url="postgresql+asyncpg://moorage@127.0.0.1:1/moorage",
    )
    completed = _init(server)
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, completed.stderr
    assert "127.0.0.1" in errors[0]


def _public_tables(database_url: str) -> int:
    """Count the tables in a PostgreSQL database's public schema."""
    import asyncio

    import asyncpg

    async def count() -> int:
        connection = await asyncpg.connect(
            database_url.replace("postgresql+asyncpg://", "postgresql://")
        )
        try:
            found: int = await connection.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
            return found
        finally:
            await connection.close()

    return asyncio.run(count())


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "MOORAGE_ADMIN_PASSWORD",
            "Qz7-pw",
            "password is too short: use at least 12 characters",
        ),
        (
            "MOORAGE_ADMIN_USERNAME",
            "-admin",
            "invalid user name '-admin'",
        ),
    ],
)
def test_init_invalid_admin_creates_nothing(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """An admin name or password that the policy rejects fails init before
    the database, the keys or any file in the data directory exist."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    env = server.environment()
    env[variable] = value
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "moorage", "init"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

        assert completed.returncode == 1
        assert message in completed.stderr
        assert variable in completed.stderr
        assert "Traceback" not in completed.stderr
        if value != "-admin":
            assert value not in completed.stderr
        assert sorted(path.name for path in data_dir.iterdir()) == []
        if server.database_url.startswith("postgresql"):
            assert _public_tables(server.database_url) == 0
    finally:
        drop_database(server.database_url)
