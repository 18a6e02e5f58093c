"""Throttling of failed logins, per account, per source address and per pair.

The policy, and why (docs/access-control.md describes it for operators):

- A pair of login name and source address gets 5 free failures, then must wait
  1 s, 2 s, 4 s ... up to 5 minutes after each further failure. This stops a
  guesser at one address without touching anyone else.
- A source address gets 20 free failures across all login names, then waits
  1 s doubling up to 15 minutes. This stops one address trying many names.
- A login name gets 100 free failures across all addresses, then waits 1 s
  doubling up to 5 minutes, except from addresses where that name logged in
  successfully in the last 30 days. A guesser spread over many addresses is
  slowed down, but cannot lock a customer's CI out: its known addresses keep
  working, and no wait ever grows past the cap.
- Counters are forgotten an hour after their last failure, and a success clears
  the pair's counter.

While a wait runs, logins are rejected without checking the password, so
guesses cost the attacker the wait and the server nothing.

The counters live in the metadata database (moorage.db.login_failure_store),
so every worker process and replica counts against the same budget, and a
restart keeps them. A check is one read. A success writes only when it clears
a failure counter or refreshes its address's known time, at most once a day
per login name and address, so the usual successful login writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from moorage.db.login_failure_store import (
    ACCOUNT,
    ADDRESS,
    PAIR,
    CounterKey,
    LoginFailureStore,
    LoginState,
    counter_keys,
)
from moorage.errors import TooManyRequestsError

log = structlog.get_logger(__name__)

# How old a known address's record may grow before a success refreshes it.
KNOWN_REFRESH_SECONDS = 86400


@dataclass(frozen=True, slots=True)
class Limit:
    free_failures: int
    max_delay: float


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    pair: Limit = Limit(free_failures=5, max_delay=300)
    address: Limit = Limit(free_failures=20, max_delay=900)
    account: Limit = Limit(free_failures=100, max_delay=300)
    forget_after: float = 3600
    known_address_days: float = 30

    def limit(self, scope: str) -> Limit:
        return {PAIR: self.pair, ADDRESS: self.address, ACCOUNT: self.account}[scope]


class LoginThrottle:
    """Counts failed logins and rejects attempts while a wait runs."""

    def __init__(
        self,
        store: LoginFailureStore,
        policy: ThrottlePolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy or ThrottlePolicy()
        self._clock = clock

    async def check(self, login: str, address: str | None) -> LoginState:
        """Raise TooManyRequestsError while any wait that applies still runs.

        Return what was read, for `succeeded`.
        """
        now = self._clock()
        state = await self.store.read(login, address or "-")
        scopes = [PAIR, ADDRESS]
        if not self._is_known(state, now):
            scopes.append(ACCOUNT)
        wait = max(_remaining(state, scope, now) for scope in scopes)
        if wait > 0:
            raise TooManyRequestsError(
                "too many failed logins; try again later", retry_after=int(wait) + 1
            )
        return state

    async def failed(self, login: str, address: str | None) -> None:
        """Count a failed login against the pair, the address and the account."""
        # NOTE: counter rows are deleted only by the purge in moorage.server
        # (every 10 minutes), so failures under many new names from many
        # addresses grow the table until then. Nothing caps its row count.
        now = self._clock()
        address = address or "-"
        keys = counter_keys(login, address)
        counts = await self.store.count_failure(
            keys, now, now - self.policy.forget_after
        )
        waits: list[tuple[CounterKey, float]] = []
        for key, failures in zip(keys, counts, strict=True):
            limit = self.policy.limit(key.scope)
            over = failures - limit.free_failures
            if over < 0:
                continue
            delay = min(2.0**over, limit.max_delay)
            waits.append((key, now + delay))
            if over & (over - 1) == 0:  # log at 0, 1, 2, 4, 8 ... over the limit
                log.warning(
                    "login throttled",
                    subject=login,
                    client=address,
                    throttle=key.scope,
                    failures=failures,
                    wait_seconds=delay,
                )
        if waits:
            await self.store.block(waits)

    async def succeeded(
        self, login: str, address: str | None, state: LoginState
    ) -> None:
        """Clear the pair's counter and remember the address as known for login.

        `state` is what `check` returned for this attempt; without failures
        and with a fresh known-address record, nothing is written.
        """
        now = self._clock()
        clear_pair = PAIR in state.counters
        refresh_known = (
            state.known_since is None or now - state.known_since > KNOWN_REFRESH_SECONDS
        )
        if clear_pair or refresh_known:
            await self.store.record_success(
                login,
                address or "-",
                clear_pair=clear_pair,
                known_at=now if refresh_known else None,
            )

    def _is_known(self, state: LoginState, now: float) -> bool:
        if state.known_since is None:
            return False
        return now - state.known_since < self.policy.known_address_days * 86400


def _remaining(state: LoginState, scope: str, now: float) -> float:
    counter = state.counters.get(scope)
    return 0.0 if counter is None else max(counter.blocked_until - now, 0.0)
