"""Detectors for suspicious activity, fed with every audit event.

Each alert is recorded as an audit event (`alert.<kind>`, outcome `alert`),
logged at WARNING and posted to the alert webhook when one is configured.
An alert for the same kind and key is raised at most once per window.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from moorage.audit.events import (
    ALERT_PREFIX,
    AUTH_LOGIN,
    AUTH_TOKEN,
    FAILURE,
    STORAGE_INTEGRITY,
    SUCCESS,
    TOKEN_ISSUE,
    AuditEvent,
    event_dict,
)

log = structlog.get_logger(__name__)

ALERT = "alert"
FAILED_LOGINS = "failed_logins"
SHARED_CREDENTIAL = "shared_credential"
UNUSABLE_CREDENTIAL = "unusable_credential"
TAMPERED_STORAGE = "tampered_storage"

_AUTH_ACTIONS = (AUTH_LOGIN, AUTH_TOKEN)
# Every action that `AlertDetector.observe` checks; it returns at once for others.
_WATCHED_ACTIONS = frozenset({*_AUTH_ACTIONS, TOKEN_ISSUE, STORAGE_INTEGRITY})
# Words in an authentication failure's reason that mean the credential itself
# was right but may no longer be used. A bearer token that merely expired is
# routine (clients fetch a new one) and is reported as "invalid token: ...".
_UNUSABLE_WORDS = ("disabled", "expired", "revoked", "suspended", "ended")
_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class AlertSettings:
    failed_logins: int = 10
    failed_login_seconds: float = 60
    credential_addresses: int = 5
    credential_window_seconds: float = 3600
    repeat_seconds: float = 600


class _Window:
    """Timestamps per key within a sliding window, for at most _MAX_KEYS keys."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: OrderedDict[str, deque[float]] = OrderedDict()

    def add(self, key: str, now: float) -> int:
        times = self._entries.pop(key, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.seconds:
            times.popleft()
        self._entries[key] = times
        if len(self._entries) > _MAX_KEYS:
            self._entries.popitem(last=False)
        return len(times)


class _Addresses:
    """Distinct source addresses per credential with the time each was last seen."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: OrderedDict[str, dict[str, float]] = OrderedDict()

    def add(self, key: str, address: str, now: float) -> int:
        seen = self._entries.pop(key, None) or {}
        seen[address] = now
        for old in [a for a, at in seen.items() if at <= now - self.seconds]:
            del seen[old]
        self._entries[key] = seen
        if len(self._entries) > _MAX_KEYS:
            self._entries.popitem(last=False)
        return len(seen)


class AlertDetector:
    """Watches audit events and raises alerts through `emit`."""

    def __init__(
        self,
        settings: AlertSettings,
        emit: Callable[[AuditEvent], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._emit = emit
        self._clock = clock
        self._failures = _Window(settings.failed_login_seconds)
        self._addresses = _Addresses(settings.credential_window_seconds)
        self._raised: OrderedDict[str, float] = OrderedDict()
        # The customer of each account seen in a failed login, for the alerts
        # raised on a later failure that carries none (a throttled login).
        self._customers: OrderedDict[str, str] = OrderedDict()

    def observe(self, event: AuditEvent) -> None:
        if event.action not in _WATCHED_ACTIONS:
            return  # nearly every event: pulls and pushes
        now = self._clock()
        if event.action in _AUTH_ACTIONS and event.outcome == FAILURE:
            self._check_failure(event, now)
        if event.outcome == SUCCESS and event.action in (AUTH_LOGIN, TOKEN_ISSUE):
            self._check_addresses(event, now)
        if event.action == STORAGE_INTEGRITY:
            self._raise(
                TAMPERED_STORAGE,
                f"object:{event.digest or event.reason}",
                event,
                event.reason or "stored data failed its integrity check",
            )

    def _check_failure(self, event: AuditEvent, now: float) -> None:
        if event.actor_account and event.actor_customer:
            self._customers.pop(event.actor_account, None)
            self._customers[event.actor_account] = event.actor_customer
            if len(self._customers) > _MAX_KEYS:
                self._customers.popitem(last=False)
        limit = self.settings.failed_logins
        keys = [("account", event.actor_account), ("address", event.source_address)]
        for kind, value in keys:
            if value and self._failures.add(f"{kind}:{value}", now) >= limit:
                self._raise(
                    FAILED_LOGINS,
                    f"{kind}:{value}",
                    event,
                    f"{limit} or more failed logins for {kind} {value} within "
                    f"{self.settings.failed_login_seconds:g} seconds",
                )
        reason = (event.reason or "").lower()
        unusable = any(word in reason for word in _UNUSABLE_WORDS)
        if unusable and not reason.startswith("invalid token") and event.actor_account:
            self._raise(
                UNUSABLE_CREDENTIAL,
                f"account:{event.actor_account}",
                event,
                f"credential of {event.actor_account} used although {reason}",
            )

    def _check_addresses(self, event: AuditEvent, now: float) -> None:
        if not event.actor_account or not event.source_address:
            return
        count = self._addresses.add(event.actor_account, event.source_address, now)
        if count > self.settings.credential_addresses:
            self._raise(
                SHARED_CREDENTIAL,
                f"account:{event.actor_account}",
                event,
                f"credential of {event.actor_account} used from {count} addresses "
                f"within {self.settings.credential_window_seconds:g} seconds",
            )

    def _raise(self, kind: str, key: str, cause: AuditEvent, reason: str) -> None:
        now = self._clock()
        last = self._raised.get(f"{kind}:{key}")
        if last is not None and now - last < self.settings.repeat_seconds:
            return
        self._raised[f"{kind}:{key}"] = now
        if len(self._raised) > _MAX_KEYS:
            self._raised.popitem(last=False)
        customer = cause.actor_customer
        if customer is None and cause.actor_account:
            customer = self._customers.get(cause.actor_account)
        self._emit(
            AuditEvent(
                ALERT_PREFIX + kind,
                outcome=ALERT,
                actor_account=cause.actor_account,
                actor_customer=customer,
                source_address=cause.source_address,
                user_agent=cause.user_agent,
                reason=reason,
                request_id=cause.request_id,
            )
        )


class AlertPublisher:
    """Records each alert in the audit log, logs it at WARNING and posts it."""

    def __init__(
        self,
        record: Callable[[AuditEvent], Any],
        webhook: Any | None,
    ) -> None:
        self._record = record
        self._webhook = webhook
        self._tasks: set[asyncio.Task[Any]] = set()

    def __call__(self, alert: AuditEvent) -> None:
        log.warning(
            "alert",
            kind=alert.action.removeprefix(ALERT_PREFIX),
            subject=alert.actor_account,
            customer=alert.actor_customer,
            source_address=alert.source_address,
            reason=alert.reason,
            request_id=alert.request_id,
        )
        if self._webhook is not None:
            self._webhook.put(event_dict(alert))
        task = asyncio.get_running_loop().create_task(self._record(alert))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
