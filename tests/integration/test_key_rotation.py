"""Key rotation and encryption of existing data while the server serves."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from pydantic import SecretStr
from sqlalchemy import select

from moorage.config import Settings
from moorage.db.audit_store import AuditFilter
from moorage.db.engine import create_engine
from moorage.db.key_store import KeyStore
from moorage.db.schema import server_keys, signing_keys
from moorage.services import Services, open_services
from moorage.storage.encryption import maintenance
from moorage.storage.encryption.database import MAGIC as SEALED_MAGIC
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.manifests import ManifestCipher
from tests.integration.test_encryption_at_rest import (
    overwrite_manifest,
    push_blob,
    push_manifest,
    raw_storage_contains,
    stored_manifest,
)
from tests.support.audit import audit_events
from tests.support.database import create_database, drop_database
from tests.support.identity import bearer, get_token
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


def _plaintext_server(tmp_path: Path) -> ServerProcess:
    """Start a server with encryption off, on a database of its own."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env={"MOORAGE_ENCRYPTION": "false"},
    )
    server.start()
    return server


def test_existing_plaintext_is_encrypted_while_serving(tmp_path: Path) -> None:
    """An installation started without encryption is converted after turning it on."""
    server = _plaintext_server(tmp_path)
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
        assert not (server.data_dir / "keys").exists()
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
    return server.run_command(*args)


async def stored_secrets(database_url: str) -> tuple[list[str], list[bytes]]:
    """Read the stored private keys and server keys straight from the database,
    without opening the services (which would seal them)."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            private_keys = (
                await connection.scalars(select(signing_keys.c.private_key))
            ).all()
            materials = (await connection.scalars(select(server_keys.c.material))).all()
    finally:
        await engine.dispose()
    return list(private_keys), [bytes(material) for material in materials]


def test_secrets_from_before_encryption_are_sealed(tmp_path: Path) -> None:
    """Signing keys and server keys stored in the clear are sealed when
    encryption is turned on, retired keys included, and tokens signed before
    still verify."""
    server = _plaintext_server(tmp_path)
    try:
        repository = f"{unique('legacy')}/app"
        with httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
        ) as client:
            digest = push_blob(client, repository, b"signed-before" * 100, chunks=1)
        old_token = get_token(
            server, ADMIN_LOGIN, ADMIN_PASSWORD, f"repository:{repository}:pull"
        )
        moorage(server, "signing-key", "rotate")
        private_keys, materials = asyncio.run(stored_secrets(server.database_url))
        assert len(private_keys) == 2
        assert all("-----BEGIN PRIVATE KEY-----" in key for key in private_keys)
        assert materials
        assert not any(material.startswith(SEALED_MAGIC) for material in materials)

        server.stop()
        server.extra_env = {}
        server.start()

        private_keys, materials = asyncio.run(stored_secrets(server.database_url))
        assert len(private_keys) == 2
        assert all(key.startswith("sealed:") for key in private_keys)
        assert not any("PRIVATE KEY" in key for key in private_keys)
        assert materials
        assert all(material.startswith(SEALED_MAGIC) for material in materials)
        blob_url = f"{server.url}/v2/{repository}/blobs/{digest}"
        response = httpx.get(blob_url, headers=bearer(old_token))
        assert response.status_code == 200, response.text
        new_token = get_token(
            server, ADMIN_LOGIN, ADMIN_PASSWORD, f"repository:{repository}:pull"
        )
        response = httpx.get(blob_url, headers=bearer(new_token))
        assert response.status_code == 200, response.text
        assert server.log().count("secrets stored in the clear sealed") == 1

        server.restart()
        assert asyncio.run(stored_secrets(server.database_url)) == (
            private_keys,
            materials,
        )
        assert server.log().count("secrets stored in the clear sealed") == 1
        response = httpx.get(blob_url, headers=bearer(old_token))
        assert response.status_code == 200, response.text
    finally:
        server.stop()
        drop_database(server.database_url)


def env_key_id(key: str) -> str:
    """Return the id Moorage gives a key from the environment."""
    secret = base64.b64decode(key)
    return "env-" + hashlib.sha256(b"moorage-kek-id:" + secret).hexdigest()[:16]


def test_env_rotation_as_documented(tmp_path: Path) -> None:
    """With the env source, `key rotate --keep-active` after a restart with the
    new key rewraps everything, exits 0 and names the old key to remove. The
    server then runs with the new key alone."""

    old_key = base64.b64encode(os.urandom(32)).decode()
    new_key = base64.b64encode(os.urandom(32)).decode()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env={
            "MOORAGE_ENCRYPTION_KEY_SOURCE": "env",
            "MOORAGE_ENCRYPTION_KEY": old_key,
        },
    )
    server.start()
    try:
        repository = f"{unique('envrotate')}/app"
        data = os.urandom(100_000)
        with httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
        ) as client:
            digest = push_blob(client, repository, data, chunks=2)
            manifest = push_manifest(client, repository, unique("env"))
        server.stop()
        server.extra_env["MOORAGE_ENCRYPTION_KEY"] = new_key
        server.extra_env["MOORAGE_ENCRYPTION_PREVIOUS_KEYS"] = json.dumps([old_key])
        server.start()

        rotated = run_cli(server, "key", "rotate", "--keep-active")

        assert rotated.returncode == 0, rotated.stderr
        lines = rotated.stdout.strip().splitlines()
        assert lines[0].startswith(
            f"rewrapped 2 keys under key-encryption key {env_key_id(new_key)}"
        )
        assert lines[1] == (
            f"key-encryption key {env_key_id(old_key)} wraps nothing now: remove it "
            "from MOORAGE_ENCRYPTION_PREVIOUS_KEYS and restart the server"
        )
        assert "error" not in rotated.stderr

        server.stop()
        del server.extra_env["MOORAGE_ENCRYPTION_PREVIOUS_KEYS"]
        server.start()
        pull_all(server, repository, {digest: data})
        response = httpx.get(
            f"{server.url}/v2/{repository}/manifests/v1",
            headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
            auth=(ADMIN_LOGIN, ADMIN_PASSWORD),
        )
        assert response.status_code == 200, response.text
        assert response.content == manifest
    finally:
        server.stop()
        drop_database(server.database_url)


def test_env_rotation_keeps_key_still_used(tmp_path: Path) -> None:
    """An earlier env key that wraps a key written after the rewrap (by a server
    that still has it as the active key) is reported as still used, not as
    one to remove."""

    old_key = base64.b64encode(os.urandom(32)).decode()
    new_key = base64.b64encode(os.urandom(32)).decode()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database_url = create_database(data_dir)

    def settings(active: str, previous: list[str]) -> Settings:
        return Settings(
            data_dir=data_dir,
            database_url=database_url,
            encryption_key_source="env",
            encryption_key=SecretStr(active),
            encryption_previous_keys=[SecretStr(key) for key in previous],
        )

    async def scenario() -> maintenance.RewrapReport:
        before = await open_services(settings(old_key, []))
        after = await open_services(settings(new_key, [old_key]))
        try:
            driver = after.registry.driver
            assert isinstance(driver, EncryptedDriver)
            store = KeyStore(after.engine)
            report = await maintenance.rotate(driver, store, new_key=False)
            assert report.unused == [env_key_id(old_key)]
            assert report.remove_from == "MOORAGE_ENCRYPTION_PREVIOUS_KEYS"
            # A server still running with the old key creates an owner key.
            old = before.registry.driver
            assert isinstance(old, EncryptedDriver)
            kek = old.keyring.active()
            await KeyStore(before.engine).get_or_add(
                "customer:late", kek.key_id, kek.wrap(os.urandom(32), b"late")
            )
            late = maintenance.RewrapReport()
            await maintenance.find_unused_keys(
                driver, store, [env_key_id(old_key)], late
            )
            return late
        finally:
            await after.close()
            await before.close()

    try:
        report = asyncio.run(scenario())
    finally:
        drop_database(database_url)
    assert report.unused == []
    assert report.still_used == {env_key_id(old_key): 1}


def test_reencrypt_interrupted_then_resumed(fresh_server: ServerProcess) -> None:
    """Ctrl-C during `key reencrypt` prints that it was interrupted and how to resume,
    exits 130, and the next run continues where it stopped."""
    repository = f"{unique('interrupt')}/app"
    blobs = {}
    with httpx.Client(
        base_url=fresh_server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD), timeout=60
    ) as client:
        for _ in range(150):
            data = os.urandom(300_000)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            response = client.post(
                f"/v2/{repository}/blobs/uploads/",
                params={"digest": digest},
                content=data,
            )
            assert response.status_code == 201, response.text
            blobs[digest] = data
    state = fresh_server.data_dir / "storage" / ".reencrypt" / "state.json"

    process = subprocess.Popen(
        [sys.executable, "-m", "moorage", "key", "reencrypt"],
        env=fresh_server.environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_until(state.exists, timeout=60)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert (
        "error: key reencrypt interrupted; the blobs re-encrypted so far keep "
        "their new data keys; run `moorage key reencrypt` again to continue from "
        "the blob where it stopped"
    ) in stderr
    assert "blobs re-encrypted" not in stdout
    assert state.exists()
    # The interrupted run's start event has its end event.
    trail = [
        (stored.event.action, stored.event.outcome, stored.event.reason)
        for stored in audit_events(fresh_server, AuditFilter(action="key.reencrypt*"))
    ]
    assert trail == [
        ("key.reencrypt.start", "success", "blobs and manifests"),
        ("key.reencrypt", "failure", "blobs and manifests: interrupted"),
    ]

    resumed = run_cli(fresh_server, "key", "reencrypt")

    assert resumed.returncode == 0, resumed.stderr
    count = int(resumed.stdout.split(" blobs re-encrypted")[0])
    assert 0 < count < len(blobs)
    assert not state.exists()
    pull_all(fresh_server, repository, blobs)
