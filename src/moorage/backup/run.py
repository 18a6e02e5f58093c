"""Make a backup of a running installation, and restore one into an empty one.

A backup reads the metadata in one read transaction and then copies the blob
files that this snapshot names. Blob files are never changed once written,
and garbage collection deletes a blob only after it has been unreferenced for
hours. Every file the snapshot names is therefore still there while it is
copied. A file that is missing anyway stops the backup, which names it.

NOTE: `key reencrypt` rewrites blob files under new data keys. A file it
rewrites between the snapshot and the copy does not match the snapshot's
wraps, and the restore check reports that blob; docs/backup.md says not to
run both at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.backup.store import (
    BackupRecord,
    BackupStore,
    FileEntry,
    check_file,
    new_backup_id,
)
from moorage.config import Settings
from moorage.db.backup_tables import (
    TableSource,
    dump,
    load,
    read_rows,
    readable_blobs,
    table_names,
)
from moorage.db.engine import MIGRATIONS_DIR, create_engine
from moorage.digests import parse_digest
from moorage.errors import BackupError
from moorage.fsync import create_private_file, fsync_directory
from moorage.services import Services
from moorage.storage import paths
from moorage.storage.drivers.base import PathNotFoundError
from moorage.storage.encryption.database import wrap_context
from moorage.storage.encryption.driver import ENVELOPES_PREFIX
from moorage.storage.encryption.keys import KeyManagementError
from moorage.storage.encryption.setup import _key_source_help, open_keyring

log = structlog.get_logger(__name__)
_CHUNK = 1024 * 1024


async def create_backup(services: Services, store: BackupStore) -> BackupRecord:
    """Write one complete backup of the installation into `store`."""
    with store.locked():
        try:
            return await _create(services, store)
        except OSError as error:
            raise BackupError(
                f"{_named(error, store.root)}: {error.strerror or error}; no "
                "backup was made. Fix the cause (space, permissions, the backup "
                "directory's layout) and run the backup again; `moorage backup "
                f"prune` removes what this one left under {store.root / 'tmp'}"
            ) from None


async def _create(services: Services, store: BackupStore) -> BackupRecord:
    storage = services.settings.resolved_storage_dir
    backup_id = new_backup_id()
    work = store.begin(backup_id)
    copier = _Copier(store, storage)

    # Envelopes are copied before the snapshot. One deleted in between was
    # deleted because its object got owner wraps, which the snapshot then holds.
    for key in _stored_keys(storage, ENVELOPES_PREFIX):
        with contextlib.suppress(FileNotFoundError):
            copier.copy(key)

    snapshot = await dump(services.engine, work / "tables")
    for digest, _size in snapshot.blobs:
        key = paths.blob_path(parse_digest(digest))
        try:
            copier.copy(key)
        except FileNotFoundError:
            raise BackupError(
                f"blob {digest} is in the database but its file {storage / key} is "
                "missing, so no backup was made. Restore that file (an earlier "
                "backup contains it under the same storage path) and run the "
                "backup again"
            ) from None

    counts = snapshot.counts
    record = BackupRecord(
        id=backup_id,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        revision=snapshot.revision,
        dialect=snapshot.dialect,
        key_ids=sorted(snapshot.key_ids),
        counts={
            "repositories": counts.get("repositories", 0),
            "manifests": counts.get("manifests", 0),
            "tags": counts.get("tags", 0),
            "blobs": len(snapshot.blobs),
        },
        total_bytes=sum(entry.size for entry in copier.entries),
        new_bytes=copier.new_bytes,
        tables=snapshot.tables,
        files=copier.entries,
        sequences=snapshot.sequences,
        shredded_blobs=snapshot.shredded_blobs,
    )
    store.commit(work, record)
    store.remember_files(copier.cache)
    return record


def _named(error: OSError, default: Path) -> str:
    """The file or files an OSError names: `a -> b` for a failed rename."""
    if error.filename is None:
        return str(default)
    if error.filename2 is not None:
        return f"{error.filename} -> {error.filename2}"
    return str(error.filename)


class _Copier:
    """Copies stored files into the backup's objects, each only once."""

    def __init__(self, store: BackupStore, storage: Path) -> None:
        self.store = store
        self.storage = storage
        self.cache = store.known_files()
        self.entries: list[FileEntry] = []
        self.new_bytes = 0

    def copy(self, key: str) -> None:
        """Copy one stored file unless the store contains it already. A file seen
        by an earlier backup with the same size and modification time is not
        read again. Raises FileNotFoundError when the file is missing."""
        source = self.storage / key
        status = source.stat()
        seen = (key, status.st_size, status.st_mtime_ns)
        sha256 = self.cache.get(seen)
        if sha256 is not None and self.store.has_object(sha256, status.st_size):
            size = status.st_size
        else:
            sha256, size, new = self.store.add_object(source)
            if new:
                self.new_bytes += size
            self.cache[seen] = sha256
        self.entries.append(FileEntry(key, sha256, size))


def _stored_keys(storage: Path, prefix: str) -> list[str]:
    root = storage / prefix
    if not root.is_dir():
        return []
    keys = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            keys.append(str(Path(directory, name).relative_to(storage)))
    return sorted(keys)


# Restore


async def restore_backup(
    settings: Settings, store: BackupStore, backup_id: str
) -> BackupRecord:
    """Restore backup `backup_id` into the installation of `settings`, which
    must be empty, and leave it empty again when anything fails before the
    database is committed. Return the backup's record; `check_restored` then
    proves the blobs."""
    try:
        return await _restore(settings, store, backup_id)
    except OSError as error:
        raise BackupError(
            f"{_named(error, store.root)}: {error.strerror or error}; the backup "
            "was not restored and the files it copied were removed. Fix the cause "
            "(space, permissions) and restore again"
        ) from None


async def _restore(
    settings: Settings, store: BackupStore, backup_id: str
) -> BackupRecord:
    record = store.load(backup_id)
    _check_revision(record.revision)
    reject_unfinished_restore(settings)
    storage = settings.resolved_storage_dir
    _reject_used_storage(storage)
    sources = [
        TableSource(table, store.table_path(record.id, table))
        for table in record.tables
    ]
    _check_tables(sources)
    _check_keys(settings, record, sources)
    engine = create_engine_for(settings)
    try:
        await _reject_used_database(engine, settings)
        # Until `finish_restore`, the marker records that the installation is
        # not checked yet, because a restore killed after its commit leaves a
        # database that looks complete. `serve` and a later restore reject it.
        marker = settings.data_dir / RESTORE_MARKER
        _write_marker(marker, f"backup {record.id} from {store.root.resolve()}")
        try:
            copied = _copy_into_storage(store, record, storage)
            try:
                await load(engine, record.revision, sources, record.sequences)
            except BaseException:
                _remove(storage, copied)
                raise
        except BaseException:
            # The installation is empty again: nothing is left to reject.
            marker.unlink(missing_ok=True)
            raise
    finally:
        await engine.dispose()
    return record


RESTORE_MARKER = "restore-unfinished"


def _write_marker(path: Path, what: str) -> None:
    with create_private_file(path) as file:
        file.write(f"{what}\n".encode())
        file.flush()
        os.fsync(file.fileno())
    fsync_directory(path.parent)


def finish_restore(settings: Settings) -> None:
    """Mark the restored installation as checked: `serve` may open it."""
    (settings.data_dir / RESTORE_MARKER).unlink(missing_ok=True)
    fsync_directory(settings.data_dir)


def reject_unfinished_restore(settings: Settings) -> None:
    """Raise when a restore into this installation began and never passed its
    check: it was interrupted, or blobs failed the check."""
    marker = settings.data_dir / RESTORE_MARKER
    try:
        what = marker.read_text().strip() or "a backup"
    except FileNotFoundError:
        return
    raise BackupError(
        f"the restore of {what} into {settings.data_dir} did not finish: it was "
        "interrupted, or blobs failed its check, so this installation may be "
        "incomplete. Empty it (remove the blob store "
        f"{settings.resolved_storage_dir} and the database, or use new ones), "
        f"delete {marker}, and restore again"
    )


async def reject_missing_installation(settings: Settings) -> None:
    """Refuse to back up an installation whose database has no tables.

    Opening the services would create a new, empty installation there (with
    its own keys and admin), and the backup of it would succeed with nothing
    in it: the mistake of a wrong `--data-dir` or of a volume that is not
    mounted.
    """
    url = settings.resolved_database_url
    sqlite_file = settings.data_dir / "moorage.db"
    if url.startswith("sqlite") and str(sqlite_file.resolve()) in url:
        if not sqlite_file.exists():
            raise BackupError(
                _no_installation(settings, f"{sqlite_file} does not exist")
            )
        return
    engine = create_engine(url)
    try:
        tables = await table_names(engine)
    finally:
        await engine.dispose()
    if not tables:
        raise BackupError(_no_installation(settings, "its database has no tables"))


def _no_installation(settings: Settings, reason: str) -> str:
    return (
        f"there is no installation to back up in {settings.data_dir}: {reason}. "
        "Check --data-dir (MOORAGE_DATA_DIR) and MOORAGE_DATABASE_URL. Nothing "
        "was created and no backup was made"
    )


def create_engine_for(settings: Settings) -> AsyncEngine:
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return create_engine(settings.resolved_database_url)


def _check_revision(revision: str) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        ScriptDirectory.from_config(config).get_revision(revision)
    except CommandError:
        raise BackupError(
            f"the backup is at database revision {revision}, which this version "
            "of Moorage does not know: it was made by a newer version. Restore it "
            "with that version or a newer one"
        ) from None


def _reject_used_storage(storage: Path) -> None:
    if not storage.exists():
        return
    for _directory, _dirs, files in os.walk(storage):
        if files:
            raise BackupError(
                f"the blob store {storage} is not empty; a backup is restored into "
                "an empty installation only (a new data directory and an empty "
                "database). Nothing was changed"
            )


async def _reject_used_database(engine: AsyncEngine, settings: Settings) -> None:
    tables = await table_names(engine)
    if tables:
        shown = ", ".join(sorted(tables)[:5])
        raise BackupError(
            f"the database of {settings.data_dir} is not empty (it has tables "
            f"{shown}{', ...' if len(tables) > 5 else ''}); a backup is restored "
            "into an empty installation only (a new data directory and an empty "
            "database). Nothing was changed"
        )


def _check_tables(sources: list[TableSource]) -> None:
    for source in sources:
        problem = check_file(source.path, source.entry.sha256, source.entry.size)
        if problem is not None:
            raise BackupError(
                f"table {source.entry.name} of the backup is damaged: {problem}; "
                "`moorage backup verify` lists every damaged file. Nothing was "
                "changed"
            )


def _check_keys(
    settings: Settings, record: BackupRecord, sources: list[TableSource]
) -> None:
    """Check that the configured key source contains every key-encryption key the
    backup's sealed keys name, and that each opens its sealed keys."""
    if not record.encrypted:
        return
    where, _remedy = _key_source_help(settings)
    try:
        keyring = open_keyring(settings)
    except (KeyManagementError, ValueError) as error:
        message = getattr(error, "message", str(error))
        raise BackupError(
            f"this backup is encrypted and the key source cannot be opened: "
            f"{message}. Nothing was changed"
        ) from None
    held = set(keyring.key_ids()) if keyring is not None else set()
    missing = sorted(set(record.key_ids) - held)
    if missing:
        raise BackupError(
            f"this backup is encrypted under key-encryption key "
            f"{', '.join(missing)}, which is not in {where}. Configure the "
            "key-encryption key of the installation the backup was made from "
            "(a backup never contains it), then restore again. Nothing was changed"
        )
    assert keyring is not None
    sealed = next(source for source in sources if source.entry.name == "sealed_keys")
    for row in read_rows(sealed.path, sealed.entry.columns):
        try:
            keyring.get(row["key_id"]).unwrap(row["wrapped"], wrap_context(row["name"]))
        except KeyManagementError:
            raise BackupError(
                f"key-encryption key {row['key_id']} in {where} is not the key "
                f"this backup was sealed with: it does not open the backup's "
                f"{row['name']} key. Configure the key-encryption key of the "
                "installation the backup was made from. Nothing was changed"
            ) from None


def _copy_into_storage(
    store: BackupStore, record: BackupRecord, storage: Path
) -> list[Path]:
    """Copy the backup's files into the blob store, checking each one's SHA-256
    on the way; on failure remove what was copied. Return the files written."""
    for entry in record.files:
        _check_storage_key(entry.path)
    written: list[Path] = []
    try:
        for entry in record.files:
            target = storage / entry.path
            _copy_checked(store.object_path(entry.sha256), target, entry)
            written.append(target)
    except BaseException:
        _remove(storage, written)
        raise
    return written


def _check_storage_key(key: str) -> None:
    """Reject a file path in backup.json that would write outside the blob
    store: a backup only contains blobs and envelopes, by relative path."""
    parts = Path(key).parts
    if (
        not parts
        or Path(key).is_absolute()
        or parts[0] not in (paths.BLOBS_PREFIX, ENVELOPES_PREFIX)
        or any(part in ("..", ".") for part in parts)
    ):
        raise BackupError(
            f"the backup names the file {key!r}, which is not a path under "
            f"{paths.BLOBS_PREFIX}/ or {ENVELOPES_PREFIX}/ in the blob store; its "
            "backup.json is damaged. Restore another backup. Nothing was changed"
        )


def _copy_checked(source: Path, target: Path, entry: FileEntry) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.restoring")
    digest = hashlib.sha256()
    try:
        try:
            reader = open(source, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise BackupError(
                f"the backup's object {source} for {entry.path} is missing; "
                "`moorage backup verify` lists every damaged file"
            ) from None
        with reader, open(temporary, "xb") as writer:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        if digest.hexdigest() != entry.sha256:
            raise BackupError(
                f"the backup's object {source} for {entry.path} is damaged (its "
                f"SHA-256 is {digest.hexdigest()}, the backup recorded "
                f"{entry.sha256}); `moorage backup verify` lists every damaged file"
            )
        os.replace(temporary, target)
        fsync_directory(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _remove(storage: Path, written: list[Path]) -> None:
    for path in written:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    # Remove the directories the copy created, deepest first.
    for directory, _dirs, _files in sorted(
        os.walk(storage, topdown=False), key=lambda item: -len(item[0])
    ):
        if Path(directory) != storage:
            with contextlib.suppress(OSError):
                os.rmdir(directory)


async def check_restored(services: Services) -> list[str]:
    """Read every restored blob through the registry's storage (decrypting
    when it is encrypted) and compare its size and digest with its row. Return
    one line per blob that differs or cannot be read."""
    driver = services.registry.driver
    problems: list[str] = []
    for digest, size in await readable_blobs(services.engine):
        path = paths.blob_path(parse_digest(digest))
        try:
            problem = await _check_blob(driver, path, digest, size)
        except PathNotFoundError:
            problem = "its file is missing"
        except KeyManagementError as error:
            problem = error.message
        except Exception as error:  # noqa: BLE001 (reported per blob)
            problem = f"{type(error).__name__}: {error}"
        if problem:
            problems.append(f"blob {digest}: {problem}")
    return problems


async def _check_blob(driver: object, path: str, digest: str, size: int) -> str | None:
    from moorage.storage.drivers.base import StorageDriver

    assert isinstance(driver, StorageDriver)
    hasher = hashlib.sha256()
    length = 0
    async for chunk in driver.read(path):
        hasher.update(chunk)
        length += len(chunk)
    if length != size:
        return f"it has {length} bytes; its row says {size}"
    if f"sha256:{hasher.hexdigest()}" != digest:
        return f"its content has digest sha256:{hasher.hexdigest()}"
    return None
