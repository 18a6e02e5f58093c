"""Key rotation and encryption of existing data while the server serves."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from moorage.services import Services
from moorage.storage.encryption.manifests import ManifestCipher
from tests.integration.test_encryption_at_rest import (
    overwrite_manifest,
    push_blob,
    push_manifest,
    raw_storage_contains,
    stored_manifest,
)
from tests.support.images import MEDIA_TYPE_OCI_MANIFEST
from tests.support.receivers import wait_until
from tests.support.registry import open_account
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
    assert output.startswith("rewrapped ")
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
        if server.database_url.startswith("sqlite"):
            # The old plaintext rows stay neither in the -wal file nor in the
            # main file's old pages: the conversion checkpoints after sealing.
            assert wait_until(lambda: marker not in sqlite_file_bytes(server))
    finally:
        server.stop()
        drop_database(server.database_url)


def sqlite_file_bytes(server: ServerProcess) -> bytes:
    """Return the bytes of the SQLite database file and of its -wal file."""
    database = Path(server.database_url.split(":///", 1)[1])
    wal = database.with_name(database.name + "-wal")
    return database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


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


def table_rows(output: str) -> dict[str, list[str]]:
    """Return the cells of each table line that `moorage` printed (headings
    too), by first cell."""
    rows = {}
    for line in output.replace("┃", "│").splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) > 1 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_key_status_counts_both_kinds(
    fresh_server: ServerProcess,
) -> None:
    """`key status` counts blob and manifest data keys under each owner key,
    and counts a shredded customer's manifests as under a destroyed key."""
    customer = fresh_server.add_customer(unique("status"))
    account = open_account(fresh_server, customer)
    with account.client:
        push_manifest(account.client, account.repository(), unique("one"))
        push_manifest(account.client, account.repository(), unique("two"))
    with httpx.Client(
        base_url=fresh_server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
    ) as vendor:
        push_manifest(vendor, f"{unique('products')}/app", unique("vendor"))

    status = moorage(fresh_server, "key", "status")
    rows = table_rows(status)
    assert rows["owner key-encryption key"] == ["blob data keys", "manifest data keys"]
    # Both manifests of the customer share one config blob.
    assert rows[f"customer:{customer}"] == ["1", "2"]
    assert rows["vendor"] == ["1", "1"]
    active = [cells for cells in rows.values() if cells[:1] == ["yes"]]
    assert active == [["yes", "2", "1", "0"]]
    assert "destroyed owner keys" not in status

    moorage(fresh_server, "customer", "suspend", customer)
    moorage(fresh_server, "customer", "shred", customer, "--confirm")
    status = moorage(fresh_server, "key", "status")
    rows = table_rows(status)
    assert f"customer:{customer}" not in rows
    assert rows["vendor"] == ["1", "1"]
    assert "2 manifests are sealed under destroyed owner keys" in status


def test_key_status_counts_unsealed_manifests(fresh_server: ServerProcess) -> None:
    """Manifests sealed with the database data key or stored in plaintext are
    counted apart from owner keys."""
    with httpx.Client(
        base_url=fresh_server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
    ) as vendor:
        first = f"{unique('legacy')}/app"
        second = f"{unique('legacy')}/app"
        push_manifest(vendor, first, unique("plain"))
        pushed = push_manifest(vendor, second, unique("database"))
    digest = "sha256:" + hashlib.sha256(pushed).hexdigest()
    sealed = fresh_server.run_admin(lambda s: database_sealed(s, pushed, digest))
    fresh_server.stop()
    overwrite_manifest(fresh_server, first, b'{"schemaVersion": 2}')
    overwrite_manifest(fresh_server, second, sealed)

    status = moorage(fresh_server, "key", "status")
    assert table_rows(status)["vendor"] == ["1", "0"]
    assert "1 manifests are sealed with the database data key" in status
    assert "1 manifests are stored in plaintext" in status


async def database_sealed(services: Services, content: bytes, digest: str) -> bytes:
    codec = services.registry.store.codec
    assert isinstance(codec, ManifestCipher)
    return codec.database.seal(content, digest)


def test_rotate_output_by_kind(
    fresh_server: ServerProcess,
) -> None:
    """`key rotate` names what it rewrapped by kind, prints when nothing needed
    it, and shows no progress bar when no blob envelope is stored."""
    customer = fresh_server.add_customer(unique("rotate"))
    account = open_account(fresh_server, customer)
    with account.client:
        push_manifest(account.client, account.repository(), unique("rotate"))

    rotated = run_cli(fresh_server, "key", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    active = [
        key
        for key, cells in table_rows(moorage(fresh_server, "key", "status")).items()
        if cells[:1] == ["yes"]
    ]
    assert len(active) == 1
    # The database data key and the owner keys of the customer and the vendor.
    assert rotated.stdout.strip() == (
        f"rewrapped 2 keys under key-encryption key {active[0]}: 2 owner and "
        "database keys, 0 blob envelopes"
    )
    assert "0/0" not in rotated.stderr
    assert "rewrapping" not in rotated.stderr

    again = run_cli(fresh_server, "key", "rotate", "--keep-active")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        "no keys to rewrap: every key is under the active key-encryption key "
        f"{active[0]}"
    )
    assert "0/0" not in again.stderr


def run_cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moorage", *args],
        env=server.environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
