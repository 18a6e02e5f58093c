"""Key rotation and encryption of existing data while the server serves."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.integration.test_encryption_at_rest import (
    push_blob,
    push_manifest,
    raw_storage_contains,
    stored_manifest,
)
from tests.support.images import MEDIA_TYPE_OCI_MANIFEST
from tests.support.receivers import wait_until
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique


def moorage(server: ServerProcess, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "moorage", *args],
        env=server.environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout


class Traffic:
    """Pushes new blobs and pulls earlier ones in a thread until stopped."""

    def __init__(self, server: ServerProcess, repository: str) -> None:
        self.client = httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD), timeout=60
        )
        self.repository = repository
        self.pushed: dict[str, bytes] = {}
        self.failures: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            data = os.urandom(200_000 + self.rounds)
            digest = push_blob(self.client, self.repository, data, chunks=2)
            self.pushed[digest] = data
            for old_digest in list(self.pushed)[-3:]:
                response = self.client.get(f"/v2/{self.repository}/blobs/{old_digest}")
                if response.content != self.pushed[old_digest]:
                    self.failures.append(f"{old_digest}: {response.status_code}")
            self.rounds += 1


def key_files(server: ServerProcess) -> set[str]:
    return {path.name for path in (server.data_dir / "keys").glob("*.key")}


def pull_all(server: ServerProcess, repository: str, blobs: dict[str, bytes]) -> None:
    with httpx.Client(
        base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
    ) as client:
        for digest, data in blobs.items():
            response = client.get(f"/v2/{repository}/blobs/{digest}")
            assert response.status_code == 200, digest
            assert hashlib.sha256(response.content).hexdigest() == digest[7:]
            assert response.content == data


def test_rotation_under_load(fresh_server: ServerProcess) -> None:
    """Traffic continues through `key rotate`; then the new key alone reads it all."""
    repository = f"{unique('rotate')}/app"
    old_keys = key_files(fresh_server)
    with Traffic(fresh_server, repository) as traffic:
        while traffic.rounds < 3:
            threading.Event().wait(0.05)
        rounds_before = traffic.rounds
        output = moorage(fresh_server, "key", "rotate")
        rounds_during = traffic.rounds
        assert rounds_during > rounds_before, "no traffic overlapped the rotation"
        while traffic.rounds < rounds_during + 3:
            threading.Event().wait(0.05)
    assert traffic.failures == []
    assert "data keys rewrapped" in output
    new_keys = key_files(fresh_server)
    assert len(old_keys) == len(new_keys) == 1
    assert old_keys != new_keys
    fresh_server.restart()
    pull_all(fresh_server, repository, traffic.pushed)
    status = moorage(fresh_server, "key", "status")
    assert status.count("yes") == 1


def test_existing_plaintext_is_encrypted_while_serving(tmp_path: Path) -> None:
    """An installation started without encryption is converted after turning it on."""
    from tests.support.database import create_database, drop_database

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env={"MOORAGE_ENCRYPTION": "false"},
    )
    server.start()
    try:
        marker = f"OLD-PLAINTEXT-{unique('m')}".encode()
        data = (marker + os.urandom(1000)) * 300
        repository = f"{unique('legacy')}/app"
        with httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
        ) as client:
            digest = push_blob(client, repository, data, chunks=2)
            manifest = push_manifest(client, repository, marker.decode())
        assert raw_storage_contains(server, marker) != []
        assert not (data_dir / "keys").exists()
        assert marker in stored_manifest(server, repository)
        server.stop()
        server.extra_env = {}
        server.start()
        deadline = threading.Event()
        for _ in range(100):
            if raw_storage_contains(server, marker) == []:
                break
            deadline.wait(0.1)
        assert raw_storage_contains(server, marker) == []
        assert marker not in stored_manifest(server, repository)
        pull_all(server, repository, {digest: data})
        with httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
        ) as client:
            response = client.get(
                f"/v2/{repository}/manifests/v1",
                headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
            )
        assert response.content == manifest
        assert wait_until(lambda: "plaintext objects encrypted" in server.log())
        assert wait_until(lambda: "manifests sealed for their owners" in server.log())
    finally:
        server.stop()
        drop_database(server.database_url)


def test_hsm_keys_serve_and_rotate(tmp_path: Path) -> None:
    """With keys on a SoftHSM2 token, blobs push, rotate online and pull back."""
    from tests.support.database import create_database, drop_database
    from tests.support.softhsm import init_token

    hsm = init_token(tmp_path / "hsm")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env=hsm.environment(),
    )
    server.start()
    try:
        repository = f"{unique('hsm')}/app"
        blobs = {}
        with httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
        ) as client:
            for size in (1000, 300_000):
                data = os.urandom(size)
                blobs[push_blob(client, repository, data, chunks=2)] = data
        before = moorage(server, "key", "status")
        assert "PKCS#11 token 'moorage-test'" in before
        moorage(server, "key", "rotate")
        after = moorage(server, "key", "status")
        old_key = before.split("hsm-")[1].split()[0]
        assert old_key not in after
        assert after.count("hsm-") == 1
        assert not (data_dir / "keys").exists()
        pull_all(server, repository, blobs)
        server.restart()
        pull_all(server, repository, blobs)
    finally:
        server.stop()
        drop_database(server.database_url)
