"""Record administrative changes: who made them, and whether they worked."""

from __future__ import annotations

import asyncio
import getpass
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from moorage.audit.events import FAILURE, START_SUFFIX, AuditEvent
from moorage.audit.log import AuditLog
from moorage.errors import MoorageError

# The reason, after the target, of the end event of a long change that Ctrl-C
# (SIGINT) or another cancellation stopped.
INTERRUPTED = "interrupted"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Actor:
    account: str | None
    customer: str | None = None
    source_address: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


def local_actor(tool: str = "moorage-cli") -> Actor:
    """Return the actor for the operating-system user running this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(account=f"os:{user}", source_address="local", user_agent=tool)


class AdminRecorder:
    """Records one audit event per administrative change, before returning."""

    def __init__(self, audit: AuditLog, actor: Actor) -> None:
        self.audit = audit
        self.actor = actor

    async def run(
        self,
        action: str,
        target: str,
        change: Awaitable[T],
        customer: str | None,
        result: Callable[[T], str] | None = None,
    ) -> T:
        """Await a change and commit its event in the same transaction.

        Both are stored or neither is (see `AuditLog.record_with`). A change that
        raises a MoorageError is rolled back, and its failure event is then
        written on its own before the error is re-raised. `target` describes what
        changed (for example "customer acme") and never contains a secret;
        `result`, when given, describes the change's return value, which the
        success event's reason adds after the target.
        """

        def event(value: T) -> AuditEvent:
            described = target if result is None else f"{target}: {result(value)}"
            return self._event(action, described, customer)

        try:
            return await self.audit.record_with(change, event)
        except MoorageError as error:
            await self._record_failure(action, target, customer, error)
            raise

    async def run_outside_transaction(
        self, action: str, target: str, change: Awaitable[T], customer: str | None
    ) -> T:
        """Record that a long change starts, await it, then record how it ended.

        For changes to stored files over minutes (key rotation, re-encryption),
        which must not hold one database transaction, and the SQLite write lock,
        for that long. Each step of such a change is resumable. The start event
        (`action` + ".start") is written before the work begins, and a start
        event that cannot be written stops the change before it begins. A
        change that fails or is interrupted (Ctrl-C, which cancels the task that
        asyncio.run runs) gets an end event with outcome failure. A crash during
        the work leaves a start without an end in the trail.
        """
        try:
            await self.audit.record_now(
                self._event(action + START_SUFFIX, target, customer)
            )
        except BaseException:
            if inspect.iscoroutine(change):
                change.close()  # never started
            raise
        try:
            result = await change
        except MoorageError as error:
            await self._record_failure(action, target, customer, error)
            raise
        except Exception as error:
            await self.audit.record_now(
                self._event(action, target, customer, FAILURE, type(error).__name__)
            )
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            # The cancellation was delivered, so this await runs. A second
            # Ctrl-C stops it and leaves the start event without an end.
            await self.audit.record_now(
                self._event(action, target, customer, FAILURE, INTERRUPTED)
            )
            raise
        # NOTE: a crash after the change and before its end event is written
        # leaves only the start event, as a crash during the change does.
        await self.audit.record_now(self._event(action, target, customer))
        return result

    async def record_done(
        self,
        action: str,
        target: str,
        customer: str | None,
        error: str | None = None,
    ) -> None:
        """Record a change made before the audit trail could take its event,
        such as a restore, which creates the trail; with `error`, as failed."""
        outcome = "success" if error is None else FAILURE
        await self.audit.record_now(
            self._event(action, target, customer, outcome, error)
        )

    async def record_rejection(
        self, action: str, target: str, customer: str | None, reason: str
    ) -> None:
        """Record a change that was rejected before it started, such as a command
        whose --until date is in the past."""
        await self.audit.record_now(
            self._event(action, target, customer, FAILURE, reason)
        )

    async def _record_failure(
        self, action: str, target: str, customer: str | None, error: MoorageError
    ) -> None:
        await self.audit.record_now(
            self._event(action, target, customer, FAILURE, error.message)
        )
        error.audited = True

    def _event(
        self,
        action: str,
        target: str,
        customer: str | None,
        outcome: str = "success",
        error: str | None = None,
    ) -> AuditEvent:
        reason = target if error is None else f"{target}: {error}"
        return AuditEvent(
            action,
            outcome=outcome,
            actor_account=self.actor.account,
            actor_customer=self.actor.customer,
            source_address=self.actor.source_address,
            user_agent=self.actor.user_agent,
            request_id=self.actor.request_id,
            repository=f"{customer}/" if customer and customer != "-" else None,
            reason=reason,
        )
