"""`moorage backup`: the restore drill, with real servers and skopeo.

A registry with encryption at rest serves while it is backed up. skopeo
pushes images before the first backup and more before the second, which must
copy only the new blobs. Each backup is restored into a new empty
installation; a server started on it serves every image that the backup
holds, and skopeo pulls each back byte-identical. The tests also check what a
backup must never contain (plaintext of a layer, the key-encryption key), that
verify names damaged files, that restore refuses a used installation and a
missing or wrong key, and that a backup moves between SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import images
from tests.support.clients import client_environment, run_client
from tests.support.database import (
    POSTGRES_DSN,
    _psql,
    backend,
    create_database,
    drop_database,
)
from tests.support.images import OciLayout
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, free_port

pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(
        shutil.which("skopeo") is None,
        reason="skopeo missing: apt-get install skopeo",
    ),
]

COMMAND_TIMEOUT = 300
REF_NAME = "org.opencontainers.image.ref.name"
CREDS = f"{ADMIN_LOGIN}:{ADMIN_PASSWORD}"
# A file in one layer, stored uncompressed, so that its plaintext would show
# in any copy of the layer that is not encrypted.
MARKER = f"moorage-backup-marker-{uuid.uuid4().hex}".encode()


def moorage(
    server: ServerProcess, *args: str | Path
) -> subprocess.CompletedProcess[str]:
    """Run `moorage ARGS` with `server`'s data directory and database."""
    return subprocess.run(
        [sys.executable, "-m", "moorage", *map(str, args)],
        env=server.environment(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


@dataclass
class Image:
    """A tag pushed from the layout: where, and the manifest digest."""

    repository: str
    tag: str
    digest: str


@dataclass
class Drill:
    layout: OciLayout
    server: ServerProcess
    directory: Path
    work: Path
    env: dict[str, str]
    # Backup id, and the images pushed before it.
    backups: list[tuple[str, list[Image]]] = field(default_factory=list)

    def record(self, backup_id: str) -> dict[str, Any]:
        path = self.directory / "backups" / backup_id / "backup.json"
        return json.loads(path.read_text())  # type: ignore[no-any-return]


def _marker_image(layout: OciLayout, tag: str) -> None:
    tar = images.LayerTar()
    tar.add_file("marker.txt", MARKER * 4)
    layer = layout.add_layer(tar.to_bytes(), "application/vnd.oci.image.layer.v1.tar")
    assert MARKER in layout.read_blob(layer.blob.digest)
    layout.tag(images.add_image(layout, [layer], images.host_architecture()), tag)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    built = OciLayout(tmp_path_factory.mktemp("images") / "layout")
    images.busybox_image(built, "busybox")
    _marker_image(built, "marker")
    images.multi_platform_index(built, "multi")
    images.random_blob_image(built, "random", layer_sizes=(2 * images.MIB,), seed=7)
    return built


def _tagged(layout: OciLayout, tag: str) -> str:
    return next(
        entry["digest"]
        for entry in layout.read_index()["manifests"]
        if entry.get("annotations", {}).get(REF_NAME) == tag
    )


def _push(drill: Drill, tag: str, repository: str) -> Image:
    run_client(
        "skopeo", "copy", "-q", "--all", "--preserve-digests",
        "--dest-tls-verify=false", "--dest-creds", CREDS,
        f"oci:{drill.layout.path}:{tag}",
        f"docker://{drill.server.address}/{repository}:1",
        env=drill.env,
    )  # fmt: skip
    return Image(repository, "1", _tagged(drill.layout, tag))


def _new_server(data_dir: Path, database_url: str | None = None) -> ServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    return ServerProcess(
        data_dir=data_dir,
        database_url=database_url or create_database(data_dir),
    )


def _create_backup(drill: Drill) -> str:
    result = moorage(drill.server, "backup", "create", drill.directory)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout
    return result.stdout.split()[1]


@pytest.fixture(scope="module")
def drill(
    layout: OciLayout, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Drill]:
    """Push two images, back up while serving, push two more, back up again."""
    work = tmp_path_factory.mktemp("drill")
    server = _new_server(work / "source")
    server.start(timeout=120)
    try:
        drill = Drill(
            layout, server, work / "backups", work, client_environment(work / "home")
        )
        # A row with an id, so that a restored sequence that starts at 1 fails.
        server.add_customer("before-backup")
        pushed = [
            _push(drill, "busybox", "products/busybox"),
            _push(drill, "marker", "products/marker"),
        ]
        drill.backups.append((_create_backup(drill), list(pushed)))
        pushed += [
            _push(drill, "multi", "products/multi"),
            _push(drill, "random", "products/random"),
        ]
        drill.backups.append((_create_backup(drill), list(pushed)))
        yield drill
    finally:
        server.stop()
        drop_database(server.database_url)


def _restore(
    drill: Drill,
    backup_id: str,
    name: str,
    keys: bool = True,
    database_url: str | None = None,
) -> tuple[ServerProcess, subprocess.CompletedProcess[str]]:
    """Restore into a new installation, with a copy of the source's keys."""
    target = _new_server(drill.work / name, database_url)
    if keys:
        shutil.copytree(drill.server.data_dir / "keys", target.data_dir / "keys")
    return target, moorage(target, "backup", "restore", drill.directory, backup_id)


def _reachable(layout: OciLayout, digest: str) -> list[str]:
    """Return `digest` and every digest its manifest or index names."""
    document = json.loads(layout.read_blob(digest))
    found = [digest]
    for child in document.get("manifests", []):
        found += _reachable(layout, child["digest"])
    if "config" in document:
        found.append(document["config"]["digest"])
    found += [layer["digest"] for layer in document.get("layers", [])]
    return found


def _pull_and_compare(drill: Drill, server: ServerProcess, image: Image) -> None:
    """Pull `image` with skopeo and compare every blob with the pushed bytes."""
    out = drill.work / f"pulled-{uuid.uuid4().hex[:8]}"
    run_client(
        "skopeo", "copy", "-q", "--all", "--preserve-digests",
        "--src-tls-verify=false", "--src-creds", CREDS,
        f"docker://{server.address}/{image.repository}:{image.tag}",
        f"oci:{out}:pulled",
        env=drill.env,
    )  # fmt: skip
    index = json.loads((out / "index.json").read_text())
    assert [entry["digest"] for entry in index["manifests"]] == [image.digest]
    for digest in _reachable(drill.layout, image.digest):
        pulled = (out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        assert pulled == drill.layout.read_blob(digest), digest


def _table_names(server: ServerProcess) -> list[str]:
    import asyncio

    from sqlalchemy import inspect

    from moorage.db.engine import create_engine

    async def names() -> list[str]:
        engine = create_engine(server.database_url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: inspect(sync).get_table_names()
                )
        finally:
            await engine.dispose()

    return asyncio.run(names())


def _files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def test_second_backup_copies_only_new_blobs(drill: Drill) -> None:
    """The first backup copies every stored file; the second copies exactly the
    files the first does not hold, and lists both old and new."""
    first, second = (drill.record(backup_id) for backup_id, _ in drill.backups)
    assert first["new_bytes"] == first["total_bytes"] > 0
    held = {entry["sha256"] for entry in first["files"]}
    added = {
        entry["sha256"]: entry["size"]
        for entry in second["files"]
        if entry["sha256"] not in held
    }
    assert added
    assert second["new_bytes"] == sum(added.values())
    assert second["new_bytes"] < second["total_bytes"]
    assert held <= {entry["sha256"] for entry in second["files"]}
    objects = {path.name for path in _files_under(drill.directory / "objects")}
    assert objects == held | set(added)


def test_list_shows_both_backups(drill: Drill) -> None:
    """`backup list` prints each backup's id, revision and counts."""
    result = moorage(drill.server, "backup", "list", drill.directory)
    assert result.returncode == 0, result.stderr
    for backup_id, _ in drill.backups:
        assert backup_id in result.stdout
        assert drill.record(backup_id)["revision"] in result.stdout


@pytest.mark.parametrize("which", [0, 1], ids=["first", "second"])
def test_restore_drill(drill: Drill, which: int) -> None:
    """A backup restored into an empty installation serves every image it contains
    byte-identical, and none pushed after it; its audit trail verifies."""
    backup_id, held = drill.backups[which]
    server, result = _restore(drill, backup_id, f"restored-{which}")
    try:
        assert result.returncode == 0, result.stderr
        assert "every blob read back with its digest" in result.stdout
        server.start(timeout=120)
        for image in held:
            _pull_and_compare(drill, server, image)
        later = [i for i in drill.backups[-1][1] if i not in held]
        assert len(later) == (2 if which == 0 else 0)
        for image in later:
            response = httpx.get(
                f"{server.url}/v2/{image.repository}/manifests/{image.tag}",
                auth=(ADMIN_LOGIN, ADMIN_PASSWORD),
            )
            assert response.status_code == 404
        verified = moorage(server, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        newest = moorage(server, "audit", "list", "--action", "backup.*")
        assert "backup.restore" in newest.stdout
    finally:
        server.stop()
        drop_database(server.database_url)


def _key_files(server: ServerProcess) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in (server.data_dir / "keys").glob("*.key")
    }


def test_restore_without_the_key_fails_clearly(drill: Drill) -> None:
    """An encrypted backup restored where its key-encryption key is missing
    stops with the key id and changes nothing."""
    backup_id, _ = drill.backups[0]
    server, result = _restore(drill, backup_id, "no-key", keys=False)
    try:
        assert result.returncode == 1
        key_id = drill.record(backup_id)["key_ids"][0]
        assert f"encrypted under key-encryption key {key_id}" in result.stderr
        assert "Nothing was changed" in result.stderr
        assert _table_names(server) == []
        assert _files_under(server.data_dir / "storage") == []
    finally:
        drop_database(server.database_url)


def test_restore_with_a_wrong_key_fails_clearly(drill: Drill) -> None:
    """A key file with the right id but other bytes is named as the wrong key."""
    backup_id, _ = drill.backups[0]
    target = _new_server(drill.work / "wrong-key")
    keys = target.data_dir / "keys"
    keys.mkdir(mode=0o700)
    for name in _key_files(drill.server):
        (keys / name).write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        (keys / name).chmod(0o600)
    shutil.copy(drill.server.data_dir / "keys" / "active", keys / "active")
    try:
        result = moorage(target, "backup", "restore", drill.directory, backup_id)
        assert result.returncode == 1
        assert "is not the key this backup was sealed with" in result.stderr
        assert _table_names(target) == []
    finally:
        drop_database(target.database_url)


def _readable_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data += gzip.decompress(data)
    return data


def test_backup_holds_no_plaintext_and_no_key(drill: Drill) -> None:
    """No file of the backup directory (table files decompressed) contains the
    marker layer's plaintext or a key-encryption key, raw or base64."""
    keys = _key_files(drill.server)
    assert keys
    secrets = [MARKER]
    for text in keys.values():
        secrets += [text.strip(), base64.b64decode(text)]
    for path in _files_under(drill.directory):
        data = _readable_bytes(path)
        for secret in secrets:
            assert secret not in data, path


def _copy_backups(drill: Drill, name: str) -> Path:
    copy = drill.work / name
    shutil.copytree(drill.directory, copy)
    return copy


def test_verify_names_a_flipped_byte_and_a_missing_file(drill: Drill) -> None:
    """verify passes on an intact directory (with --decrypt, through the key)
    and names the storage path and object of a changed and a missing file."""
    intact = moorage(drill.server, "backup", "verify", drill.directory, "--decrypt")
    assert intact.returncode == 0, intact.stderr
    assert "every file and blob content as recorded" in intact.stdout

    copy = _copy_backups(drill, "damaged")
    files = drill.record(drill.backups[0][0])["files"]
    flipped, removed = files[0], files[1]
    flipped_object = copy / "objects" / flipped["sha256"][:2] / flipped["sha256"]
    data = bytearray(flipped_object.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped_object.write_bytes(bytes(data))
    (copy / "objects" / removed["sha256"][:2] / removed["sha256"]).unlink()

    result = moorage(drill.server, "backup", "verify", copy)
    assert result.returncode == 1
    output = " ".join(result.stderr.split())
    assert f"{flipped['path']}: {flipped_object} has SHA-256" in output
    assert f"{removed['path']}: " in output
    assert f"{removed['sha256']} is missing" in output


def test_prune_keeps_the_newest_and_its_objects(drill: Drill) -> None:
    """prune --keep 1 removes the first backup, and an interrupted backup's
    files and object; the second backup keeps every object and verifies."""
    copy = _copy_backups(drill, "pruned")
    (copy / "tmp" / "20200101T000000Z-000000" / "tables").mkdir(parents=True)
    orphan = hashlib.sha256(b"interrupted").hexdigest()
    (copy / "objects" / orphan[:2]).mkdir(exist_ok=True)
    (copy / "objects" / orphan[:2] / orphan).write_bytes(b"interrupted")
    first, second = (backup_id for backup_id, _ in drill.backups)
    result = moorage(drill.server, "backup", "prune", copy, "--keep", "1")
    assert result.returncode == 0, result.stderr
    assert f"removed 1 backups ({first}) and 1 objects" in result.stdout
    assert sorted(path.name for path in (copy / "backups").iterdir()) == [second]
    assert list((copy / "tmp").iterdir()) == []
    needed = {entry["sha256"] for entry in drill.record(second)["files"]}
    assert {path.name for path in _files_under(copy / "objects")} == needed
    verified = moorage(drill.server, "backup", "verify", copy)
    assert verified.returncode == 0, verified.stderr


def test_restore_refuses_a_used_installation(drill: Drill) -> None:
    """Restore into the running source installation, or into a data directory
    whose blob store contains a file, stops and changes nothing."""
    before = _files_under(drill.server.data_dir / "storage")
    used = moorage(
        drill.server, "backup", "restore", drill.directory, drill.backups[0][0]
    )
    assert used.returncode == 1
    assert "is not empty" in used.stderr
    assert "Nothing was changed" in used.stderr
    assert _files_under(drill.server.data_dir / "storage") == before

    target = _new_server(drill.work / "stray-file")
    stray = target.data_dir / "storage" / "blobs" / "stray"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    try:
        result = moorage(
            target, "backup", "restore", drill.directory, drill.backups[0][0]
        )
        assert result.returncode == 1
        assert "blob store" in result.stderr
        assert _table_names(target) == []
    finally:
        drop_database(target.database_url)


def _empty_again(installation: ServerProcess) -> None:
    """Empty an installation as the operator is told to: blob store and
    database (the key directory stays)."""
    shutil.rmtree(installation.data_dir / "storage", ignore_errors=True)
    if installation.database_url.startswith("postgresql"):
        name = installation.database_url.rsplit("/", 1)[1]
        drop_database(installation.database_url)
        _psql(f'CREATE DATABASE "{name}"')
    else:
        for path in installation.data_dir.glob("moorage.db*"):
            path.unlink()


def test_interrupted_restore_is_rejected(drill: Drill) -> None:
    """A restore killed midway leaves an installation that may look complete.
    `serve` and a second restore reject it and say how to start again; after
    that, the restore succeeds."""
    target = _new_server(drill.work / "killed-restore")
    shutil.copytree(drill.server.data_dir / "keys", target.data_dir / "keys")
    marker = target.data_dir / "restore-unfinished"
    backup_id = drill.backups[1][0]
    try:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "moorage", "backup", "restore"),
                *(str(drill.directory), backup_id),
            ],
            env=target.environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not marker.exists() and process.poll() is None:
            time.sleep(0.002)
        process.kill()
        assert process.wait() == -signal.SIGKILL, "the restore ended before the kill"

        again = moorage(target, "backup", "restore", drill.directory, backup_id)
        assert again.returncode == 1
        message = " ".join(again.stderr.split())
        assert "did not finish" in message
        assert f"delete {marker}" in message
        served = subprocess.run(
            [sys.executable, "-m", "moorage", "serve", "--port", str(free_port())],
            env=target.environment(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert served.returncode == 1
        assert "did not finish" in served.stderr

        _empty_again(target)
        marker.unlink()
        restored = moorage(target, "backup", "restore", drill.directory, backup_id)
        assert restored.returncode == 0, restored.stderr
        assert not marker.exists()
    finally:
        drop_database(target.database_url)


def test_create_names_a_missing_blob_file(drill: Drill) -> None:
    """A blob whose file is gone stops `create` with its digest and path, and
    leaves no backup that `list` shows."""
    installation, restored = _restore(drill, drill.backups[0][0], "missing-blob")
    try:
        assert restored.returncode == 0, restored.stderr
        blob = next((installation.data_dir / "storage" / "blobs").rglob("*/*/*"))
        blob.unlink()
        directory = drill.work / "missing-blob-backups"
        result = moorage(installation, "backup", "create", directory)
        assert result.returncode == 1
        message = " ".join(result.stderr.split())
        assert f"blob sha256:{blob.name} is in the database" in message
        assert f"its file {blob} is missing, so no backup was made" in message
        listed = moorage(installation, "backup", "list", directory)
        assert listed.returncode == 0, listed.stderr
        assert "no complete backups" in listed.stdout
    finally:
        drop_database(installation.database_url)


def _other_database(data_dir: Path) -> str:
    """Return a new empty database of the backend this run does not use."""
    if backend() == "postgresql":
        return f"sqlite+aiosqlite:///{data_dir / 'moorage.db'}"
    name = f"moorage_test_{uuid.uuid4().hex[:12]}"
    _psql(f'CREATE DATABASE "{name}"')
    return f"{POSTGRES_DSN}/{name}"


def _postgresql_reachable() -> bool:
    with contextlib.suppress(Exception):
        _psql("SELECT 1")
        return True
    return False


@pytest.mark.skipif(not _postgresql_reachable(), reason="no PostgreSQL on 5432")
def test_backup_restores_into_the_other_database(drill: Drill) -> None:
    """A backup of SQLite restores into PostgreSQL (and one of PostgreSQL into
    SQLite), and serves its images byte-identical."""
    backup_id, held = drill.backups[-1]
    data_dir = drill.work / "other-database"
    data_dir.mkdir()
    url = _other_database(data_dir)
    server, result = _restore(drill, backup_id, data_dir.name, database_url=url)
    try:
        assert result.returncode == 0, result.stderr
        server.start(timeout=120)
        for image in held:
            _pull_and_compare(drill, server, image)
        # New rows get ids past the restored ones (sequences were reset).
        added = moorage(server, "customer", "add", "after-restore", "--name", "A")
        assert added.returncode == 0, added.stderr
    finally:
        server.stop()
        drop_database(server.database_url)


def test_backup_files_match_their_index(drill: Drill) -> None:
    """Every object is named by the SHA-256 of its bytes."""
    for path in _files_under(drill.directory / "objects"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
