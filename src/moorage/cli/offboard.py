"""`moorage customer offboard`: suspend a customer, archive its images, delete them.

`moorage.cli.main` imports this module at its end; the command registers itself
on its `customer` app.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import structlog
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from moorage import admin
from moorage.audit import events as actions
from moorage.cli.main import (
    DataDirOption,
    _audited,
    _audited_outside_transaction,
    _recorder,
    _run,
    _settings,
    console,
    customer_app,
    errors,
    records_rejections,
    reject,
)
from moorage.db.registry_store import DeletedContents, NamespaceContents
from moorage.errors import MoorageError, NotFoundError
from moorage.services import Services
from moorage.storage import paths
from moorage.storage.archive import ArchiveError, ArchiveReport, write_archive
from moorage.storage.drivers.base import PathNotFoundError

log = structlog.get_logger(__name__)

# `--delete-after` takes a number and a unit: days or hours.
_PERIOD = re.compile(r"([0-9]{1,5})([dh])")


@dataclass
class _Outcome:
    """The result of one offboarding, for the summary it prints."""

    suspended: bool
    namespaces: list[str]
    granted: list[str]
    archived: ArchiveReport | None = None
    deleted: DeletedContents | None = None
    encrypted: bool = False
    # When --delete-after deletes the repositories, and the date it replaced.
    delete_after: datetime | None = None
    replaced: datetime | None = None


@customer_app.command("offboard")
@records_rejections(actions.CUSTOMER_OFFBOARD, "customer offboard")
def customer_offboard(
    customer: str,
    archive: Annotated[
        Path | None,
        typer.Option(
            "--archive",
            help="Write the customer's images to this new file: an OCI image "
            "layout in a tar archive.",
            dir_okay=False,
        ),
    ] = None,
    delete_now: Annotated[
        bool,
        typer.Option(
            "--delete-now",
            help="Delete the customer's repositories after the archive is written.",
        ),
    ] = False,
    delete_after: Annotated[
        str | None,
        typer.Option(
            "--delete-after",
            help="Delete the customer's repositories after this period, such as "
            "30d (days) or 12h (hours); `moorage gc` and the server delete them "
            "when it ends, and `customer resume` cancels it.",
            show_default=False,
        ),
    ] = None,
    confirm: Annotated[
        bool,
        typer.Option(
            "--confirm",
            help="Required for --delete-now without --archive: delete without a copy.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Suspend a customer (every login and token stops), write its images to an
    archive, and delete its repositories, now or after a retention period."""
    if delete_now and delete_after is not None:
        reject("give --delete-now or --delete-after, not both")
    if delete_now and archive is None and not confirm:
        reject(
            f"--delete-now without --archive deletes the images of customer "
            f"{customer} with no copy; add --archive FILE, or run again with "
            "--confirm to delete them anyway"
        )
    period = None if delete_after is None else _parse_period(delete_after)
    if archive is not None:
        _check_new_file(archive)

    async def offboard(services: Services) -> _Outcome:
        contents, outcome = await _check_and_suspend(services, customer, archive)
        if archive is not None:
            outcome.archived = await _archive(services, customer, contents, archive)
        if delete_now:
            outcome.deleted = await _delete(services, customer, outcome.namespaces)
        if period is not None:
            when = datetime.now(UTC) + period
            outcome.delete_after = when
            outcome.replaced = await _audited(
                services,
                actions.CUSTOMER_SCHEDULE_DELETION,
                f"customer {customer} repositories deleted after "
                f"{when:%Y-%m-%d %H:%M} UTC",
                customer,
                admin.schedule_deletion(services.identity, customer, when),
            )
        return outcome

    outcome = _run(_settings(data_dir=data_dir), offboard, atomic=False)
    _print_outcome(customer, archive, outcome)


def _parse_period(text: str) -> timedelta:
    """Parse a retention period such as 30d or 12h; reject anything else."""
    match = _PERIOD.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        reject(
            f"--delete-after {text!r} is not a period; give a number of days or "
            "hours above 0, such as 30d or 12h"
        )
    count = int(match.group(1))
    return timedelta(days=count) if match.group(2) == "d" else timedelta(hours=count)


def _check_new_file(archive: Path) -> None:
    """Reject an archive path that exists or whose directory is missing."""
    try:
        exists = archive.exists()
        parent_is_dir = archive.parent.is_dir()
    except OSError as error:
        reject(f"--archive {archive}: {error.strerror}")
    if exists:
        reject(f"--archive {archive} exists already; choose a new file name")
    if not parent_is_dir:
        reject(f"--archive: directory {archive.parent} does not exist")


async def _check_and_suspend(
    services: Services, customer: str, archive: Path | None
) -> tuple[NamespaceContents, _Outcome]:
    """Check what can fail before anything changes, then suspend the customer."""
    try:
        record = await services.identity.get_customer(customer)
    except NotFoundError as error:
        await _recorder(services).record_rejection(
            actions.CUSTOMER_OFFBOARD, "customer offboard", customer, error.message
        )
        raise

    namespaces = await services.identity.namespaces_of(record.id)
    contents = await services.registry.store.namespace_contents(namespaces)
    if archive is not None:
        problem = _archive_problem(contents, namespaces, archive)
        if problem is not None:
            await _recorder(services).record_rejection(
                actions.CUSTOMER_ARCHIVE, f"customer {customer}", customer, problem
            )
            raise ArchiveError(problem)

    suspended = await _audited(
        services,
        actions.CUSTOMER_SUSPEND,
        f"customer {customer}",
        customer,
        admin.set_customer_active(services.identity, customer, False),
    )
    grants = await services.identity.list_grants(record.id)
    granted = sorted(
        {g.pattern for g in grants if g.pattern.split("/")[0] not in namespaces}
    )
    # Read again: a push that was in flight while the suspension committed may
    # have added manifests since the first read.
    contents = await services.registry.store.namespace_contents(namespaces)
    encrypted = services.settings.encryption
    outcome = _Outcome(suspended, namespaces, granted, encrypted=encrypted)
    return contents, outcome


def _archive_problem(
    contents: NamespaceContents, namespaces: list[str], archive: Path
) -> str | None:
    """Return why the archive cannot be written, before the customer changes."""
    if not contents.manifests:
        return (
            "nothing to archive: the customer's namespaces "
            f"({', '.join(namespaces) or 'none'}) contain no manifests"
        )
    partial = archive.with_name(archive.name + ".partial")
    if partial.exists():
        return (
            f"{partial} exists, left by an interrupted offboarding; delete it and "
            "run the command again"
        )
    try:
        with open(partial, "xb"):
            pass
        partial.unlink()
    except OSError as error:
        return f"cannot write {partial}: {error.strerror}"
    return None


async def _archive(
    services: Services, customer: str, contents: NamespaceContents, archive: Path
) -> ArchiveReport:
    total = sum(blob.size for blob in contents.blobs)
    with Progress(
        TextColumn("archiving"),
        BarColumn(),
        DownloadColumn(),
        console=errors,
        transient=True,
        disable=not errors.is_terminal,
    ) as progress:
        task = progress.add_task("archive", total=total)
        return await _audited_outside_transaction(
            services,
            actions.CUSTOMER_ARCHIVE,
            f"customer {customer} images to {archive}",
            customer,
            write_archive(
                services.registry,
                contents,
                archive,
                lambda done: progress.advance(task, done),
            ),
        )


async def _delete(
    services: Services, customer: str, namespaces: list[str]
) -> DeletedContents:
    deleted = await _audited(
        services,
        actions.CUSTOMER_DELETE_REPOSITORIES,
        f"customer {customer} repositories in {', '.join(namespaces)}",
        customer,
        services.registry.store.delete_namespace_repositories(namespaces),
        _describe_deleted,
    )
    # The sessions' rows are gone, so their data would otherwise wait for the
    # stale upload purge.
    for upload_id in deleted.upload_ids:
        try:
            await services.registry.driver.delete(paths.upload_dir(upload_id))
        except (PathNotFoundError, OSError, MoorageError) as error:
            log.debug("upload data not deleted", upload=upload_id, exc_info=error)
    return deleted


def _describe_deleted(deleted: DeletedContents) -> str:
    return (
        f"{deleted.repositories} repositories, {deleted.manifests} manifests, "
        f"{deleted.tags} tags and {len(deleted.upload_ids)} upload sessions deleted"
    )


def _print_outcome(customer: str, archive: Path | None, outcome: _Outcome) -> None:
    state = "suspended" if outcome.suspended else "was already suspended"
    console.print(
        f"customer {customer} {state}; every login and token of it is refused",
        highlight=False,
    )
    if outcome.archived is not None:
        report = outcome.archived
        console.print(
            f"archived {report.repositories} repositories, {report.tags} tags, "
            f"{report.manifests} manifests and {report.blobs} blobs "
            f"({report.blob_bytes} bytes) to {archive}; read it with "
            f"skopeo copy oci-archive:{archive}:REPOSITORY:TAG",
            highlight=False,
            soft_wrap=True,
        )
    if outcome.granted:
        console.print(
            f"not archived: repositories the customer was granted but does not "
            f"own ({', '.join(outcome.granted)})",
            highlight=False,
            soft_wrap=True,
        )
    if outcome.deleted is not None:
        deleted = outcome.deleted
        console.print(
            f"{_describe_deleted(deleted)}. {deleted.unused_blobs} blobs "
            f"({deleted.unused_bytes} bytes) are now used by no repository; "
            "garbage collection (`moorage gc`, or the server every "
            "gc_interval_hours) deletes their files once gc_grace_hours have "
            "passed",
            highlight=False,
            soft_wrap=True,
        )
        if outcome.encrypted:
            console.print(
                f"to make its blobs unreadable everywhere, run "
                f"`moorage customer shred {customer} --confirm`",
                highlight=False,
                soft_wrap=True,
            )
    elif outcome.delete_after is not None:
        replaced = (
            f" (instead of {outcome.replaced:%Y-%m-%d %H:%M} UTC)"
            if outcome.replaced is not None
            else ""
        )
        console.print(
            f"its repositories are deleted after "
            f"{outcome.delete_after:%Y-%m-%d %H:%M} UTC{replaced}, by `moorage gc` "
            f"or the server; `moorage customer resume {customer}` cancels that",
            highlight=False,
            soft_wrap=True,
        )
    elif archive is None:
        console.print(
            "its repositories stay; add --archive FILE and --delete-now to "
            "archive and delete them",
            highlight=False,
            soft_wrap=True,
        )
