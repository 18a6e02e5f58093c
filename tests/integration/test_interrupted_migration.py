"""A first start stopped in the middle of the migration leaves the database as
it was, so the next start migrates it and serves."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.database import backend, create_database, drop_database
from tests.support.server import ServerProcess

HOOK = Path(__file__).parent / "interrupt_hook"
# The batch rebuilds below happen on SQLite only; PostgreSQL alters in place
# and runs fewer statements.
SQLITE_ONLY = pytest.mark.skipif(
    backend() != "sqlite", reason="SQLite rebuilds tables in batch mode"
)


@pytest.mark.parametrize(
    ("after_ddl", "signal_name"),
    [
        # Right after the first table of revision 0001, blobs (the first
        # statement creates alembic_version).
        (2, "SIGKILL"),
        (2, "SIGINT"),
        # Revision 0005_shred rebuilds sealed_keys in batch mode: after its DROP.
        pytest.param(21, "SIGKILL", marks=SQLITE_ONLY),
        # Revision 0011 rebuilds audit_events: after its DROP, before the
        # rename, among the last statements of the history.
        pytest.param(46, "SIGINT", marks=SQLITE_ONLY),
    ],
)
def test_interrupted_migration_rolls_back(
    tmp_path: Path, after_ddl: int, signal_name: str
) -> None:
    server = ServerProcess(
        data_dir=tmp_path / "data", database_url="", extra_env={"MOORAGE_WORKERS": "1"}
    )
    server.data_dir.mkdir()
    server.database_url = create_database(server.data_dir)
    try:
        environment = server.environment()
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(HOOK), environment.get("PYTHONPATH")])
        )
        environment["MOORAGE_TEST_SIGNAL_AFTER_DDL"] = f"{after_ddl}:{signal_name}"
        # A session of its own: the hook signals the process group, as a
        # terminal does on Ctrl-C, without reaching pytest.
        first = subprocess.run(
            server.serve_command(),
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
            check=False,
        )
        output = first.stdout + first.stderr
        if signal_name == "SIGKILL":
            assert first.returncode == -signal.SIGKILL, output
        else:
            assert first.returncode != 0, output
            assert "Traceback" not in output
        if backend() == "sqlite":
            # Nothing of the migration was committed.
            database = sqlite3.connect(server.data_dir / "moorage.db")
            try:
                tables = database.execute("SELECT name FROM sqlite_master").fetchall()
            finally:
                database.close()
            assert tables == []

        server.start()
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
        drop_database(server.database_url)
