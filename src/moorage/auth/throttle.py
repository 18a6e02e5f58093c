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
guesses cost the attacker the wait and the server nothing. The state lives in
the process's memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from moorage.errors import TooManyRequestsError

log = structlog.get_logger(__name__)


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
    # Bound on tracked counters, so a flood of names cannot exhaust memory.
    max_entries: int = 100_000


@dataclass(slots=True)
class _Counter:
    failures: int = 0
    last_failure: float = 0.0
    blocked_until: float = 0.0


@dataclass(slots=True)
class _Known:
    addresses: dict[str, float] = field(default_factory=dict)


class LoginThrottle:
    """Counts failed logins and rejects attempts while a wait runs."""

    def __init__(
        self,
        policy: ThrottlePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._counters: OrderedDict[tuple[str, str], _Counter] = OrderedDict()
        self._known: OrderedDict[str, _Known] = OrderedDict()

    def check(self, login: str, address: str | None) -> None:
        """Raise TooManyRequestsError while any wait that applies still runs."""
        now = self._clock()
        address = address or "-"
        waits = [
            self._remaining(("pair", f"{login}\0{address}"), now),
            self._remaining(("address", address), now),
        ]
        if not self._is_known(login, address, now):
            waits.append(self._remaining(("account", login), now))
        wait = max(waits)
        if wait > 0:
            raise TooManyRequestsError(
                "too many failed logins; try again later", retry_after=int(wait) + 1
            )

    def failed(self, login: str, address: str | None) -> None:
        """Count a failed login against the pair, the address and the account."""
        now = self._clock()
        address = address or "-"
        limits = (
            (("pair", f"{login}\0{address}"), self.policy.pair),
            (("address", address), self.policy.address),
            (("account", login), self.policy.account),
        )
        for key, limit in limits:
            counter = self._count(key, now)
            over = counter.failures - limit.free_failures
            if over >= 0:
                delay = min(2.0**over, limit.max_delay)
                counter.blocked_until = now + delay
                if over & (over - 1) == 0:  # log at 0, 1, 2, 4, 8 ... over the limit
                    log.warning(
                        "login throttled",
                        subject=login,
                        client=address,
                        throttle=key[0],
                        failures=counter.failures,
                        wait_seconds=delay,
                    )

    def succeeded(self, login: str, address: str | None) -> None:
        """Clear the pair's counter and remember the address as known for login."""
        now = self._clock()
        address = address or "-"
        self._counters.pop(("pair", f"{login}\0{address}"), None)
        known = self._known.setdefault(login, _Known())
        known.addresses[address] = now
        self._known.move_to_end(login)
        if len(known.addresses) > 64:
            oldest = min(known.addresses, key=known.addresses.__getitem__)
            del known.addresses[oldest]
        while len(self._known) > self.policy.max_entries:
            self._known.popitem(last=False)

    def _count(self, key: tuple[str, str], now: float) -> _Counter:
        counter = self._counters.get(key)
        if counter is None or now - counter.last_failure > self.policy.forget_after:
            counter = _Counter()
            self._counters[key] = counter
        counter.failures += 1
        counter.last_failure = now
        self._counters.move_to_end(key)
        while len(self._counters) > self.policy.max_entries:
            self._counters.popitem(last=False)
        return counter

    def _remaining(self, key: tuple[str, str], now: float) -> float:
        counter = self._counters.get(key)
        return 0.0 if counter is None else max(counter.blocked_until - now, 0.0)

    def _is_known(self, login: str, address: str, now: float) -> bool:
        known = self._known.get(login)
        if known is None or address not in known.addresses:
            return False
        return now - known.addresses[address] < self.policy.known_address_days * 86400
