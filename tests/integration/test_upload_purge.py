"""Stale upload sessions are cancelled and their partial data deleted."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx

from moorage.db.schema import utcnow
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess


def test_purge_removes_stale_session(fresh_server: ServerProcess) -> None:
    """A session idle past the expiry disappears with its data."""
    server = fresh_server
    with httpx.Client(
        base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
    ) as client:
        started = client.post("/v2/vendor/purge-test/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["Location"]
        upload_id = started.headers["Docker-Upload-UUID"]
        assert client.patch(location, content=b"partial data").status_code == 202
        upload_dir = server.data_dir / "storage" / "uploads" / upload_id
        assert upload_dir.is_dir()

        purged = server.run_admin(
            lambda s: s.registry.purge_stale_uploads(utcnow() + timedelta(seconds=1))
        )

        assert purged == 1
        assert not upload_dir.exists()
        status = client.get(location)
    assert status.status_code == 404
    assert status.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_start_empties_upload_trash(fresh_server: ServerProcess) -> None:
    """Upload data left in trash/ by a stopped server is deleted when it starts."""
    server = fresh_server
    server.stop()
    trash = server.data_dir / "storage" / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    leftover = trash / "0123456789abcdef"
    leftover.write_bytes(b"data of a finished upload")

    server.start()

    deadline = time.monotonic() + 10
    while leftover.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftover.exists()
