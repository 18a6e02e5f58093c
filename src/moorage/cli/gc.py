"""`moorage gc`: delete unreferenced blobs, links and (optionally) untagged
manifests, and the repositories whose scheduled deletion is due.

`moorage.cli.main` imports this module at its end; the command registers itself
on its app.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from moorage import maintenance
from moorage.audit import events as actions
from moorage.audit.recorder import local_actor
from moorage.cli.main import (
    DataDirOption,
    _run,
    _settings,
    app,
    console,
    records_rejections,
    reject,
)
from moorage.db.gc_store import GcStore
from moorage.db.schema import utcnow
from moorage.services import Services
from moorage.storage.gc import GcReport


@app.command("gc")
@records_rejections(actions.GC_RUN, "gc")
def gc(
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print what would be deleted, and change nothing."
        ),
    ] = False,
    delete_untagged: Annotated[
        bool,
        typer.Option(
            "--delete-untagged",
            help="Delete manifests that no tag names, that no kept index names "
            "and that are not referrers of a kept manifest.",
        ),
    ] = False,
    grace_hours: Annotated[
        float | None,
        typer.Option(
            "--grace-hours",
            help="Grace period in hours instead of the gc_grace_hours setting.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Free the space of blobs that no manifest references, safely while the
    server runs.

    A blob goes once it has been unreferenced for the grace period
    (gc_grace_hours), and a repository's link to a blob that none of its
    manifests references once the link is that old. Repositories whose
    deletion `customer offboard --delete-after` scheduled are deleted first
    when it is due.
    """
    if grace_hours is not None and not 0 <= grace_hours < 1e6:
        reject(
            f"--grace-hours {grace_hours:g} is invalid; give 0 or more hours, "
            "below 1000000"
        )
    grace = None if grace_hours is None else timedelta(hours=grace_hours)
    actor = local_actor()

    async def action(
        services: Services,
    ) -> tuple[list[maintenance.ScheduledDeletion], list[str], GcReport]:
        done: list[maintenance.ScheduledDeletion] = []
        due: list[str] = []
        if dry_run:
            due = [
                f"{row.slug} (scheduled for {row.delete_after:%Y-%m-%d %H:%M} UTC)"
                for row in await GcStore(services.engine).due_deletions(utcnow())
            ]
        else:
            done = await maintenance.run_due_deletions(services, actor)
        report = await maintenance.collect_garbage(
            services,
            actor,
            maintenance.collector(services, grace),
            dry_run=dry_run,
            delete_untagged=delete_untagged,
        )
        return done, due, report

    done, due, report = _run(_settings(data_dir=data_dir), action, atomic=False)
    for deletion in done:
        deleted = deletion.deleted
        console.print(
            f"deleted the repositories of customer {deletion.customer}, scheduled "
            f"for {deletion.due:%Y-%m-%d %H:%M} UTC: {deleted.repositories} "
            f"repositories, {deleted.manifests} manifests, {deleted.tags} tags",
            highlight=False,
            soft_wrap=True,
        )
    for customer in due:
        console.print(
            f"would delete the repositories of customer {customer}",
            highlight=False,
            soft_wrap=True,
        )
    if report.restored:
        console.print(
            f"{report.restored} blob files that an interrupted run had moved "
            "were put back",
            highlight=False,
        )
    console.print(report.describe(), highlight=False, soft_wrap=True)
