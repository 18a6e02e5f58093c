"""Fixtures shared by every test: a real server process and its database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.database import create_database, drop_database
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One registry for the whole run; tests keep apart by using unique names."""
    data_dir = tmp_path_factory.mktemp("server")
    process = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        # Every test connects from 127.0.0.1, so the per-address limit on failed
        # logins would let one test's wrong passwords throttle all the others.
        extra_env={"MOORAGE_LOGIN_FREE_FAILURES_PER_ADDRESS": "100000"},
    )
    process.start()
    yield process
    process.stop()
    drop_database(process.database_url)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A registry of the test's own, for tests that restart or kill it."""
    process = ServerProcess(data_dir=tmp_path / "data", database_url="")
    process.data_dir.mkdir()
    process.database_url = create_database(process.data_dir)
    process.start()
    yield process
    process.stop()
    drop_database(process.database_url)


@pytest.fixture
def admin_client(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client that sends the vendor admin's Basic credentials."""
    with httpx.Client(
        base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
    ) as client:
        yield client
