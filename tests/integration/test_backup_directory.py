"""`moorage backup` and its backup directory, run as an operator runs it.

The drill with images and skopeo is in tests/e2e/test_backup.py. These tests
use an installation without images and check what the commands write and
print when the backup directory is shared, damaged or cannot be written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moorage.backup.store import BackupStore
from tests.support.database import create_database, drop_database


@dataclass
class Installation:
    data_dir: Path
    url: str
    backups: Path

    def moorage(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
        env.update(MOORAGE_DATA_DIR=str(self.data_dir), MOORAGE_DATABASE_URL=self.url)
        return subprocess.run(
            [sys.executable, "-m", "moorage", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def create(self) -> str:
        result = self.moorage("backup", "create", self.backups)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[1]


@pytest.fixture
def installation(tmp_path: Path) -> Iterator[Installation]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = create_database(data_dir)
    try:
        made = Installation(data_dir, url, tmp_path / "backups")
        initialised = made.moorage("init")
        assert initialised.returncode == 0, initialised.stderr
        yield made
    finally:
        drop_database(url)


def test_create_refuses_an_installation_that_does_not_exist(tmp_path: Path) -> None:
    """An empty data directory and database (a wrong --data-dir, a volume that
    is not mounted) are not backed up as a new, empty installation: create
    fails, and neither the installation nor the backup directory is made."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = create_database(data_dir)
    try:
        empty = Installation(data_dir, url, tmp_path / "backups")
        result = empty.moorage("backup", "create", empty.backups)
        assert result.returncode == 1
        assert "there is no installation to back up" in result.stderr
        assert "no backup was made" in result.stderr
        assert list(data_dir.iterdir()) == []
        assert not empty.backups.exists()
        if url.startswith("postgresql"):
            tables = empty.moorage("backup", "create", empty.backups)
            assert "its database has no tables" in tables.stderr
    finally:
        drop_database(url)


def test_backup_files_are_private(
    installation: Installation,
) -> None:
    """A backup holds the database: none of its files or directories is
    readable by others, even when the directory's mode is later widened or it
    is copied elsewhere with its modes."""
    old = os.umask(0o022)
    try:
        installation.create()
        installation.create()
    finally:
        os.umask(old)
    shared = []
    for directory, folders, files in os.walk(installation.backups):
        for name in [*folders, *files]:
            path = Path(directory, name)
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                shared.append(f"{path}: {oct(stat.S_IMODE(path.stat().st_mode))}")
    assert shared == []


def test_create_write_error_is_one_line(
    installation: Installation,
) -> None:
    installation.create()
    # Completing a backup renames it into backups/; make that impossible.
    backups = installation.backups / "backups"
    for child in backups.iterdir():
        os.rename(child, installation.backups / "tmp" / f"moved-{child.name}")
    backups.rmdir()
    backups.write_text("not a directory")
    result = installation.moorage("backup", "create", installation.backups)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "no backup was made" in result.stderr
    assert str(backups) in result.stderr


def test_damaged_record_hides_no_backup(
    installation: Installation,
) -> None:
    damaged = installation.create()
    intact = installation.create()
    record = installation.backups / "backups" / damaged / "backup.json"
    record.write_text(record.read_text()[:40])

    listed = installation.moorage("backup", "list", installation.backups)
    assert listed.returncode == 1
    assert intact in listed.stdout
    assert damaged in listed.stderr
    assert "Traceback" not in listed.stderr

    verified = installation.moorage("backup", "verify", installation.backups)
    assert verified.returncode == 1
    assert f"backup {damaged}" in verified.stderr
    assert "backup.json" in verified.stderr
    assert "Traceback" not in verified.stderr
    # The intact backup was checked too: a damaged table of it is named.
    table = json.loads(
        (installation.backups / "backups" / intact / "backup.json").read_text()
    )["tables"][0]["file"]
    (installation.backups / "backups" / intact / table).write_bytes(b"x")
    verified = installation.moorage("backup", "verify", installation.backups)
    assert verified.returncode == 1
    assert f"backup {intact}: table" in verified.stderr


def test_prune_stops_on_damaged_record(
    installation: Installation,
) -> None:
    oldest = installation.create()
    newest = installation.create()
    record = installation.backups / "backups" / newest / "backup.json"
    record.write_text("{")
    result = installation.moorage(
        "backup", "prune", installation.backups, "--keep", "1"
    )
    assert result.returncode == 1
    assert "Nothing was pruned" in result.stderr
    assert "Traceback" not in result.stderr
    assert (installation.backups / "backups" / oldest / "backup.json").is_file()


def test_verify_fails_without_backups(installation: Installation) -> None:
    """Only an interrupted backup: `verify` must not report success."""
    installation.create()
    backups = installation.backups / "backups"
    for child in backups.iterdir():
        os.rename(child, installation.backups / "tmp" / child.name)
    verified = installation.moorage("backup", "verify", installation.backups)
    assert verified.returncode == 1
    assert "no complete backups" in verified.stderr


def test_restore_writes_only_into_blob_store(
    installation: Installation, tmp_path: Path
) -> None:
    """A damaged backup.json that names a file outside the blob store is
    rejected before anything is written."""
    backup_id = installation.create()
    content = b"written outside the blob store"
    digest = hashlib.sha256(content).hexdigest()
    stored = installation.backups / "objects" / digest[:2] / digest
    stored.parent.mkdir(parents=True)
    stored.write_bytes(content)
    record_path = installation.backups / "backups" / backup_id / "backup.json"
    record = json.loads(record_path.read_text())
    record["files"].append(
        {"path": "../escaped", "sha256": digest, "size": len(content)}
    )
    record_path.write_text(json.dumps(record))

    target_dir = tmp_path / "target"
    target_dir.mkdir()
    shutil.copytree(installation.data_dir / "keys", target_dir / "keys")
    target = Installation(target_dir, create_database(target_dir), tmp_path / "x")
    try:
        result = target.moorage("backup", "restore", installation.backups, backup_id)
        assert result.returncode == 1
        assert "../escaped" in result.stderr
        assert not (target_dir / "escaped").exists()
    finally:
        drop_database(target.url)


def test_prune_waits_for_no_reader(installation: Installation) -> None:
    """A prune while a verify or restore reads the directory would remove the
    objects they read: it refuses and removes nothing, and a verify refuses
    while a prune runs."""
    first = installation.create()
    installation.create()
    store = BackupStore.open(installation.backups)
    with store.reading():
        result = installation.moorage(
            "backup", "prune", installation.backups, "--keep", "1"
        )
    assert result.returncode == 1
    assert "`moorage backup verify` or `restore` is running" in result.stderr
    assert (installation.backups / "backups" / first).is_dir()
    with store._flock("readers.lock", fcntl.LOCK_EX, "test"):
        verify = installation.moorage("backup", "verify", installation.backups)
    assert verify.returncode == 1
    assert "`moorage backup prune` is running" in verify.stderr
