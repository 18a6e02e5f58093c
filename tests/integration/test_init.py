"""`moorage init`: the first start's set-up, without serving."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

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
