"""`moorage backup create|list|verify|restore|prune`.

`moorage.cli.main` imports this module at its end; the commands register
themselves on its Typer app. docs/backup.md describes what a backup contains.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from sqlalchemy.exc import SQLAlchemyError

from moorage.audit import events as actions
from moorage.backup.run import (
    check_restored,
    create_backup,
    finish_restore,
    reject_missing_installation,
    restore_backup,
)
from moorage.backup.store import BackupRecord, BackupStore, verify_files
from moorage.cli.main import (
    DataDirOption,
    _database_reason,
    _exit_for_connection_error,
    _print_error,
    _recorder,
    _run,
    _settings,
    app,
    console,
    errors,
)
from moorage.cli.output import shown
from moorage.config import Settings
from moorage.db.engine import UNREACHABLE_DATABASE_ERRORS
from moorage.errors import BackupError, MoorageError
from moorage.logs import configure_logging
from moorage.services import Services, open_services

T = TypeVar("T")

backup_app = typer.Typer(
    help="Back up the installation into a directory, verify and restore backups.",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")

DirectoryArgument = Annotated[
    Path, typer.Argument(help="The backup directory.", file_okay=False)
]


def _open_store(directory: Path, *, create: bool = False) -> BackupStore:
    try:
        return BackupStore.open(directory, create=create)
    except BackupError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    except OSError as error:
        errors.print(f"[red]error:[/red] {shown(directory)}: {shown(error.strerror)}")
        raise typer.Exit(1) from None


@contextlib.contextmanager
def _reading(store: BackupStore) -> Iterator[None]:
    """Hold the store's readers' lock; exit when a prune holds it."""
    try:
        with store.reading():
            yield
    except BackupError as error:
        _print_error(error)
        raise typer.Exit(1) from None


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@backup_app.command("create")
def backup_create(directory: DirectoryArgument, data_dir: DataDirOption = None) -> None:
    """Back up the metadata and blobs into DIRECTORY, while the server runs.

    Blobs that an earlier backup in DIRECTORY copied are not copied again.
    """
    settings = _settings(data_dir=data_dir)
    _async(settings, reject_missing_installation(settings))
    store = _open_store(directory, create=True)

    async def action(services: Services) -> BackupRecord:
        return await _recorder(services).run_outside_transaction(
            actions.BACKUP_CREATE,
            f"backup into {directory.resolve()}",
            create_backup(services, store),
            None,
        )

    record = _run(settings, action, atomic=False)
    console.print(
        f"backup {record.id} complete: {record.counts['repositories']} "
        f"repositories, {record.counts['manifests']} manifests, "
        f"{record.counts['blobs']} blobs ({_size(record.total_bytes)}, of which "
        f"{_size(record.new_bytes)} copied now), database revision {record.revision}",
        highlight=False,
        soft_wrap=True,
    )
    if record.encrypted:
        console.print(
            "the blobs and sealed keys are encrypted: restoring needs key-encryption "
            f"key {', '.join(record.key_ids)}, which the backup does not contain",
            highlight=False,
            soft_wrap=True,
        )


@backup_app.command("list")
def backup_list(directory: DirectoryArgument) -> None:
    """List the complete backups in DIRECTORY, oldest first."""
    store = _open_store(directory)
    records, damaged = store.readable_records()
    if not records and not damaged:
        console.print(f"no complete backups in {shown(directory)}")
    # One line per backup, whatever the terminal's width: ids are copied into
    # commands, so they are never cut short.
    for record in records:
        counts = record.counts
        time = record.created_at.replace("T", " ")[:19]
        console.print(
            f"{record.id}  {time}  revision {record.revision}  "
            f"{counts['repositories']} repositories, {counts['manifests']} "
            f"manifests, {counts['tags']} tags, {counts['blobs']} blobs  "
            f"{_size(record.total_bytes)} total, {_size(record.new_bytes)} new"
            f"{'  encrypted' if record.encrypted else ''}",
            highlight=False,
            soft_wrap=True,
        )
    for problem in damaged:
        errors.print(f"[red]damaged:[/red] {shown(problem)}", soft_wrap=True)
    if damaged:
        raise typer.Exit(1)


@backup_app.command("verify")
def backup_verify(
    directory: DirectoryArgument,
    backup_id: Annotated[
        str | None, typer.Argument(help="One backup's id; default: every backup.")
    ] = None,
    decrypt: Annotated[
        bool,
        typer.Option(
            "--decrypt",
            help="Also restore the backup into a scratch installation with the "
            "configured keys and check every blob's content digest.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Check that every file of the backups is present with its recorded SHA-256."""
    store = _open_store(directory)
    with _reading(store):
        _verify(store, directory, backup_id, decrypt, data_dir)


def _verify(
    store: BackupStore,
    directory: Path,
    backup_id: str | None,
    decrypt: bool,
    data_dir: Path | None,
) -> None:
    problems: list[str] = []
    if backup_id:
        try:
            records = [store.load(backup_id)]
        except BackupError as error:
            _print_error(error)
            raise typer.Exit(1) from None
    else:
        records, problems = store.readable_records()
    problems += verify_files(store, records)
    if not records and not problems:
        # A check that finds nothing to check must not pass: a cron job that
        # verifies an empty directory would report backups that do not exist.
        problems.append(f"no complete backups in {directory}; nothing was verified")
    if not problems and decrypt:
        settings = _settings(data_dir=data_dir)
        for record in records:
            problems += _async(settings, _scratch_check(settings, store, record))
    for problem in problems:
        errors.print(f"[red]damaged:[/red] {shown(problem)}", soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    checked = "file and blob content" if decrypt else "file"
    console.print(
        f"{len(records)} backups verified: every {checked} as recorded",
        highlight=False,
    )


async def _scratch_check(
    settings: Settings, store: BackupStore, record: BackupRecord
) -> list[str]:
    """Restore `record` into a scratch installation inside the backup
    directory, check every blob through the configured keys, and remove it."""
    scratch = store.root / "tmp" / f"verify-{secrets.token_hex(6)}"
    scratch_settings = settings.model_copy(
        update={
            "data_dir": scratch,
            "database_url": None,
            "storage_dir": None,
            "audit_archive_dir": None,
            "encryption_key_dir": settings.resolved_key_dir,
            # Read with the keys; create none.
            "encryption": False,
        }
    )
    try:
        await restore_backup(scratch_settings, store, record.id)
        services = await open_services(scratch_settings, migrate_schema=False)
        try:
            problems = await check_restored(services)
        finally:
            await services.close()
        return [f"backup {record.id}: {problem}" for problem in problems]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@backup_app.command("restore")
def backup_restore(
    directory: DirectoryArgument,
    backup_id: Annotated[str, typer.Argument(help="The backup's id (`backup list`).")],
    data_dir: DataDirOption = None,
) -> None:
    """Restore a backup into an empty installation, then check every blob.

    The installation is the configured data directory and database, which must
    be empty; an encrypted backup needs the key-encryption key of the
    installation it was made from.
    """
    settings = _settings(data_dir=data_dir)
    store = _open_store(directory)
    target = f"backup {backup_id} from {directory.resolve()}"

    async def restore() -> tuple[BackupRecord, list[str]]:
        record = await restore_backup(settings, store, backup_id)
        services = await open_services(settings)
        try:
            problems = await check_restored(services)
            failure = f"{len(problems)} blobs failed the check" if problems else None
            await _recorder(services).record_done(
                actions.BACKUP_RESTORE, target, None, failure
            )
        finally:
            await services.close()
        if not problems:
            finish_restore(settings)
        return record, problems

    with _reading(store):
        record, problems = _async(settings, restore())
    for problem in problems:
        errors.print(f"[red]damaged:[/red] {shown(problem)}", soft_wrap=True)
    if problems:
        errors.print(
            f"[red]error:[/red] backup {shown(record.id)} was restored, but "
            f"{len(problems)} blobs failed the check above; do not serve this "
            "installation",
            soft_wrap=True,
        )
        raise typer.Exit(1)
    console.print(
        f"backup {record.id} restored into {settings.data_dir.resolve()}: "
        f"{record.counts['repositories']} repositories, "
        f"{record.counts['manifests']} manifests, {record.counts['blobs']} blobs; "
        "every blob read back with its digest",
        highlight=False,
        soft_wrap=True,
    )


@backup_app.command("prune")
def backup_prune(
    directory: DirectoryArgument,
    keep: Annotated[
        int, typer.Option("--keep", min=1, help="How many of the newest to keep.")
    ],
) -> None:
    """Remove all but the newest backups, and the blobs no kept backup needs."""
    store = _open_store(directory)
    try:
        with store.locked():
            removed, objects, size = store.prune(keep)
    except BackupError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    console.print(
        f"removed {len(removed)} backups ({', '.join(removed) or 'none'}) and "
        f"{objects} objects ({_size(size)})",
        highlight=False,
        soft_wrap=True,
    )


def _async(settings: Settings, work: Awaitable[T]) -> T:
    """Run `work` and turn its errors into one line and exit code 1."""
    configure_logging(
        "debug" if settings.log_level == "debug" else "warning", settings.log_format
    )
    try:
        return asyncio.run(_awaited(work))
    except MoorageError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    except SQLAlchemyError as error:
        errors.print(
            f"[red]error:[/red] database error: {shown(_database_reason(error))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    except UNREACHABLE_DATABASE_ERRORS as error:
        _exit_for_connection_error(settings, error)


async def _awaited(work: Awaitable[T]) -> T:
    return await work
