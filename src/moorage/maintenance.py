"""Maintenance that both `moorage gc` and the server run: garbage collection
and the repository deletions that `customer offboard --delete-after` scheduled.
Each records its audit events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from moorage.audit import events as actions
from moorage.audit.events import FAILURE, AuditEvent
from moorage.audit.recorder import Actor, AdminRecorder
from moorage.db.gc_store import DueDeletion, GcStore
from moorage.db.registry_store import DeletedContents
from moorage.db.schema import utcnow
from moorage.errors import MoorageError
from moorage.services import Services
from moorage.storage import paths
from moorage.storage.gc import GarbageCollector, GcBusyError, GcReport

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ScheduledDeletion:
    """A deletion that `customer offboard --delete-after` scheduled, done."""

    customer: str
    due: datetime
    deleted: DeletedContents


def collector(services: Services, grace: timedelta | None = None) -> GarbageCollector:
    """Return a collector of the services' registry, with the configured grace
    period unless `grace` is given."""
    if grace is None:
        grace = timedelta(hours=services.settings.gc_grace_hours)
    return GarbageCollector(services.registry, GcStore(services.engine), grace)


async def collect_garbage(
    services: Services,
    actor: Actor,
    gc: GarbageCollector,
    *,
    dry_run: bool = False,
    delete_untagged: bool = False,
) -> GcReport:
    """Run garbage collection once and record one `gc.run` event with its
    counts. A dry run records none, because it changes nothing, and neither
    does a run that found another process collecting (GcBusyError)."""
    try:
        report = await gc.collect(dry_run=dry_run, delete_untagged=delete_untagged)
    except GcBusyError:
        raise
    except Exception as error:
        if not dry_run:
            reason = error.message if isinstance(error, MoorageError) else ""
            await services.audit.record_now(
                _event(
                    actor,
                    actions.GC_RUN,
                    f"garbage collection failed: {reason or type(error).__name__}",
                    FAILURE,
                )
            )
            if isinstance(error, MoorageError):
                error.audited = True
        raise
    if not dry_run:
        event = _event(actor, actions.GC_RUN, report.describe())
        event.bytes = report.bytes
        await services.audit.record_now(event)
    return report


async def run_due_deletions(
    services: Services, actor: Actor, now: datetime | None = None
) -> list[ScheduledDeletion]:
    """Delete the repositories of every customer whose scheduled deletion is
    due, each in one transaction with its `customer.delete_repositories`
    event. A deletion that another process took first is skipped."""
    store = GcStore(services.engine)
    done: list[ScheduledDeletion] = []
    for due in await store.due_deletions(now or utcnow()):
        deleted = await _delete_scheduled(services, actor, store, due)
        if deleted is not None:
            done.append(ScheduledDeletion(due.slug, due.delete_after, deleted))
    return done


async def _delete_scheduled(
    services: Services, actor: Actor, store: GcStore, due: DueDeletion
) -> DeletedContents | None:
    namespaces = await services.identity.namespaces_of(due.customer_id)

    async def change() -> DeletedContents | None:
        if not await store.take_due_deletion(due):
            return None
        return await services.registry.store.delete_namespace_repositories(namespaces)

    def describe(deleted: DeletedContents | None) -> str:
        if deleted is None:
            return "already done by another process"
        return (
            f"{deleted.repositories} repositories, {deleted.manifests} manifests, "
            f"{deleted.tags} tags and {len(deleted.upload_ids)} upload sessions "
            "deleted"
        )

    target = (
        f"customer {due.slug} repositories in {', '.join(namespaces) or 'none'}, "
        f"scheduled for {due.delete_after:%Y-%m-%d %H:%M} UTC"
    )
    deleted = await AdminRecorder(services.audit, actor).run(
        actions.CUSTOMER_DELETE_REPOSITORIES, target, change(), due.slug, describe
    )
    if deleted is None:
        return None
    log.info(
        "scheduled deletion of a customer's repositories done",
        customer=due.slug,
        repositories=deleted.repositories,
    )
    for upload_id in deleted.upload_ids:
        try:
            await services.registry.driver.delete(paths.upload_dir(upload_id))
        except (OSError, MoorageError) as error:
            log.debug("upload data not deleted", upload=upload_id, exc_info=error)
    return deleted


def _event(
    actor: Actor, action: str, reason: str, outcome: str = actions.SUCCESS
) -> AuditEvent:
    return AuditEvent(
        action,
        outcome=outcome,
        actor_account=actor.account,
        actor_customer=actor.customer,
        source_address=actor.source_address,
        user_agent=actor.user_agent,
        reason=reason,
    )


async def run_periodically(
    services: Services,
    actor: Actor,
    interval: timedelta,
    sleep: Callable[[float], Awaitable[None]],
) -> None:
    """Collect garbage every `interval`, first after one interval, until
    cancelled. A run that finds another process collecting is skipped."""
    while True:
        await sleep(interval.total_seconds())
        try:
            report = await collect_garbage(services, actor, collector(services))
        except GcBusyError:
            log.info("garbage collection skipped: another process is collecting")
        except Exception:
            log.exception("garbage collection failed")
        else:
            log.info("garbage collection done", summary=report.describe())
