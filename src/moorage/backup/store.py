"""The backup directory: backups, their indexes, and the objects they share.

Layout of a backup directory:

    moorage-backups.json               marks the directory and its format
    objects/<aa>/<sha256>              stored files, named by the SHA-256 of
                                       their bytes, shared by every backup
    backups/<id>/backup.json           one complete backup: what it holds, and
                                       the SHA-256 and size of each of its files
    backups/<id>/tables/<name>.jsonl.gz
    tmp/                               files and backups being written

A backup becomes complete when its directory is renamed from `tmp/` into
`backups/`, after every file in it and every object it names was written and
fsynced. An interrupted backup leaves files under `tmp/` and objects that no
backup names; neither is listed, and `prune` removes them.

Objects contain a stored file as it is stored: for an installation with
encryption at rest, ciphertext. A backup never contains a key-encryption key.

TODO: the product brief also names an object store (S3) as a backup target;
only a local directory is built. A second store class with the same methods
(objects by SHA-256, backups committed by writing backup.json last) would fit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from moorage.db.backup_tables import TableEntry, sha256_of_file
from moorage.errors import BackupError
from moorage.fsync import create_private_file, fsync_directory

FORMAT = 1
MARKER = "moorage-backups.json"
RECORD = "backup.json"
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One stored file in a backup: its storage key, and its object."""

    path: str
    sha256: str
    size: int


@dataclass
class BackupRecord:
    """The record of one backup, as `backup.json` stores it."""

    id: str
    created_at: str
    revision: str
    dialect: str
    key_ids: list[str]
    counts: dict[str, int]
    total_bytes: int
    new_bytes: int
    tables: list[TableEntry]
    files: list[FileEntry]
    sequences: dict[str, int] = field(default_factory=dict)
    # Blobs that shredding left unreadable: their rows are in the backup,
    # their files are not.
    shredded_blobs: int = 0

    @property
    def encrypted(self) -> bool:
        return bool(self.key_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "created_at": self.created_at,
            "revision": self.revision,
            "dialect": self.dialect,
            "key_ids": self.key_ids,
            "counts": self.counts,
            "total_bytes": self.total_bytes,
            "new_bytes": self.new_bytes,
            "shredded_blobs": self.shredded_blobs,
            "sequences": self.sequences,
            "tables": [vars_of(table) for table in self.tables],
            "files": [vars_of(entry) for entry in self.files],
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> BackupRecord:
        if value.get("format") != FORMAT:
            raise BackupError(
                f"backup {value.get('id')} has format {value.get('format')}; this "
                f"version of Moorage reads format {FORMAT}"
            )
        return cls(
            id=value["id"],
            created_at=value["created_at"],
            revision=value["revision"],
            dialect=value["dialect"],
            key_ids=list(value["key_ids"]),
            counts=dict(value["counts"]),
            total_bytes=value["total_bytes"],
            new_bytes=value["new_bytes"],
            shredded_blobs=value.get("shredded_blobs", 0),
            sequences=dict(value.get("sequences", {})),
            tables=[TableEntry(**table) for table in value["tables"]],
            files=[FileEntry(**entry) for entry in value["files"]],
        )


def vars_of(entry: FileEntry | TableEntry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in entry.__slots__}


def new_backup_id() -> str:
    """Return an id that sorts by creation time: 20261206T001500Z-3fa9c1."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class BackupStore:
    """A backup directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, root: Path, *, create: bool = False) -> BackupStore:
        """Open a backup directory; with `create`, make a new one when `root`
        is missing or empty."""
        marker = root / MARKER
        if marker.is_file():
            format_ = json.loads(marker.read_text()).get("format")
            if format_ != FORMAT:
                raise BackupError(
                    f"backup directory {root} has format {format_}; this version "
                    f"of Moorage reads format {FORMAT}"
                )
            return cls(root)
        if not create:
            raise BackupError(
                f"{root} is not a backup directory (it has no {MARKER}); "
                "`moorage backup create DIR` makes one"
            )
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise BackupError(
                f"{root} is not empty and is not a backup directory; choose a new "
                "or empty directory"
            )
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The tables contain password hashes, and with encryption off, signing
        # keys and image content in the clear.
        root.chmod(0o700)
        for name in ("objects", "backups", "tmp"):
            (root / name).mkdir(mode=0o700, exist_ok=True)
        _write_durably(root / MARKER, json.dumps({"format": FORMAT}).encode(), root)
        return cls(root)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock: one `create` or `prune` at a time, so that
        a prune never removes the files of a backup being written."""
        with self._flock(
            "lock", fcntl.LOCK_EX, "another `moorage backup create` or `prune`"
        ):
            yield

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the readers' lock shared, while `verify` or `restore` reads
        backups: `prune` takes it exclusively, so it removes nothing they read.
        Readers do not exclude each other, nor `create`, which removes nothing."""
        with self._flock("readers.lock", fcntl.LOCK_SH, "`moorage backup prune`"):
            yield

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int, holder: str) -> Iterator[None]:
        with open(self.root / name, "a+b") as file:
            os.fchmod(file.fileno(), 0o600)
            try:
                fcntl.flock(file.fileno(), mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackupError(
                    f"{holder} is running on {self.root}; run this command when "
                    "it has finished"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)

    # Objects

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def object_name(self, sha256: str) -> str:
        return f"objects/{sha256[:2]}/{sha256}"

    def has_object(self, sha256: str, size: int) -> bool:
        try:
            return self.object_path(sha256).stat().st_size == size
        except FileNotFoundError:
            return False

    def add_object(self, source: Path) -> tuple[str, int, bool]:
        """Copy a file into the objects; return its SHA-256, its size, and
        whether it was new. Raises FileNotFoundError when `source` is missing."""
        temporary = self.root / "tmp" / f"object-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as reader, create_private_file(temporary) as writer:
                while chunk := reader.read(_CHUNK):
                    digest.update(chunk)
                    writer.write(chunk)
                    size += len(chunk)
                writer.flush()
                os.fsync(writer.fileno())
            sha256 = digest.hexdigest()
            if self.has_object(sha256, size):
                return sha256, size, False
            target = self.object_path(sha256)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(temporary, target)
            fsync_directory(target.parent)
            return sha256, size, True
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    # Backups

    def begin(self, backup_id: str) -> Path:
        """Make the directory a new backup is written into, under `tmp/`."""
        work = self.root / "tmp" / backup_id
        # The backup's own directory is private too: `mkdir(parents=True)`
        # would give it the umask's mode.
        (self.root / "tmp").mkdir(mode=0o700, exist_ok=True)
        work.mkdir(mode=0o700)
        (work / "tables").mkdir(mode=0o700)
        return work

    def commit(self, work: Path, record: BackupRecord) -> None:
        """Write the backup's record and move it into `backups/`: complete."""
        tables = work / "tables"
        for table in tables.iterdir():
            with open(table, "rb") as file:
                os.fsync(file.fileno())
        fsync_directory(tables)
        data = json.dumps(record.to_json(), indent=1).encode()
        _write_durably(work / RECORD, data, work)
        target = self.root / "backups" / record.id
        os.replace(work, target)
        fsync_directory(self.root / "backups")
        fsync_directory(self.root / "tmp")

    def ids(self) -> list[str]:
        """Ids of the complete backups, oldest first."""
        backups = self.root / "backups"
        return sorted(p.name for p in backups.iterdir() if (p / RECORD).is_file())

    def load(self, backup_id: str) -> BackupRecord:
        path = self.root / "backups" / backup_id / RECORD
        if "/" in backup_id or not path.is_file():
            known = ", ".join(self.ids()) or "none"
            raise BackupError(
                f"no complete backup {backup_id} in {self.root} (backups: {known})"
            )
        try:
            return BackupRecord.from_json(json.loads(path.read_bytes()))
        except (ValueError, KeyError, TypeError) as error:
            raise BackupError(
                f"backup {backup_id}: {path} cannot be read ({error}), so this "
                "backup cannot be verified or restored; restore another backup"
            ) from None
        except OSError as error:
            raise BackupError(
                f"backup {backup_id}: {path} cannot be read ({error.strerror})"
            ) from None

    def records(self) -> list[BackupRecord]:
        return [self.load(backup_id) for backup_id in self.ids()]

    def readable_records(self) -> tuple[list[BackupRecord], list[str]]:
        """Return the complete backups whose record can be read, and one line
        for each whose record cannot: one damaged `backup.json` hides no
        other backup."""
        records: list[BackupRecord] = []
        problems: list[str] = []
        for backup_id in self.ids():
            try:
                records.append(self.load(backup_id))
            except BackupError as error:
                problems.append(error.message)
        return records, problems

    def table_path(self, backup_id: str, table: TableEntry) -> Path:
        return self.root / "backups" / backup_id / table.file

    def known_files(self) -> dict[tuple[str, int, int], str]:
        """Return the SHA-256 of files that earlier backups copied, by storage
        key, size and modification time (ns), as the file cache of `create`."""
        cache_path = self.root / "file-cache.json"
        try:
            entries = json.loads(cache_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return {(e[0], e[1], e[2]): e[3] for e in entries}

    def remember_files(self, cache: dict[tuple[str, int, int], str]) -> None:
        entries = [[*key, sha256] for key, sha256 in sorted(cache.items())]
        _write_durably(
            self.root / "file-cache.json", json.dumps(entries).encode(), self.root
        )

    def prune(self, keep: int) -> tuple[list[str], int, int]:
        """Remove all but the newest `keep` backups, unfinished backups and the
        objects no remaining backup names. Return the removed ids, and the count
        and bytes of removed objects."""
        with self._flock(
            "readers.lock", fcntl.LOCK_EX, "`moorage backup verify` or `restore`"
        ):
            return self._prune(keep)

    def _prune(self, keep: int) -> tuple[list[str], int, int]:
        ids = self.ids()
        removed = ids[: max(len(ids) - keep, 0)]
        # Read the kept records first: an object is removed only when no kept
        # backup names it, which a damaged record cannot tell.
        kept: list[BackupRecord] = []
        for backup_id in ids[len(removed) :]:
            try:
                kept.append(self.load(backup_id))
            except BackupError as error:
                raise BackupError(
                    f"{error.message}. Nothing was pruned: which objects that "
                    f"backup needs is unknown. Move {self.root / 'backups' / backup_id}"
                    " out of the backup directory, then prune again"
                ) from None
        for backup_id in removed:
            doomed = self.root / "tmp" / f"pruned-{backup_id}"
            os.replace(self.root / "backups" / backup_id, doomed)
        fsync_directory(self.root / "backups")
        for leftover in (self.root / "tmp").iterdir():
            if leftover.name == "lock":
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        needed = {entry.sha256 for record in kept for entry in record.files}
        count = size = 0
        for path in self._object_files():
            if path.name not in needed:
                size += path.stat().st_size
                path.unlink()
                count += 1
        return removed, count, size

    def _object_files(self) -> Iterator[Path]:
        for folder in sorted((self.root / "objects").iterdir()):
            yield from sorted(folder.iterdir())


def _write_durably(path: Path, data: bytes, directory: Path) -> None:
    """Write a small file under a temporary name, fsync it, and rename it."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        with create_private_file(temporary) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_directory(directory)


def verify_files(store: BackupStore, records: Iterable[BackupRecord]) -> list[str]:
    """Check every table file and object that `records` name: present, of the
    recorded size and SHA-256. Return one line per problem."""
    problems: list[str] = []
    checked: dict[str, str | None] = {}
    for record in records:
        for table in record.tables:
            path = store.table_path(record.id, table)
            problem = check_file(path, table.sha256, table.size)
            if problem:
                problems.append(f"backup {record.id}: table {table.name}: {problem}")
        for entry in record.files:
            if entry.sha256 not in checked:
                path = store.object_path(entry.sha256)
                checked[entry.sha256] = check_file(path, entry.sha256, entry.size)
            problem = checked[entry.sha256]
            if problem:
                problems.append(f"backup {record.id}: {entry.path}: {problem}")
    return problems


def check_file(path: Path, sha256: str, size: int) -> str | None:
    try:
        actual_size = path.stat().st_size
        if actual_size != size:
            return f"{path} has {actual_size} bytes; the backup recorded {size}"
        actual = sha256_of_file(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as error:
        return f"{path} cannot be read: {error.strerror}"
    if actual != sha256:
        return f"{path} has SHA-256 {actual}; the backup recorded {sha256}"
    return None
