"""`/healthz` and `/readyz`."""

from __future__ import annotations

import httpx

from tests.support.server import ServerProcess


def test_readyz_storage_root_missing(fresh_server: ServerProcess) -> None:
    """`/readyz` answers 503 with storage failed while the blob store's
    directory is gone, and 200 once it is back; `/healthz` stays 200."""
    storage = fresh_server.data_dir / "storage"
    assert httpx.get(f"{fresh_server.url}/readyz").status_code == 200
    storage.rename(fresh_server.data_dir / "storage.off")
    try:
        ready = httpx.get(f"{fresh_server.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["storage"] == "failed: FileNotFoundError"
        assert ready.json()["database"] == "ok"
        assert httpx.get(f"{fresh_server.url}/healthz").status_code == 200
    finally:
        (fresh_server.data_dir / "storage.off").rename(storage)
    assert httpx.get(f"{fresh_server.url}/readyz").json() == {
        "database": "ok",
        "storage": "ok",
    }
