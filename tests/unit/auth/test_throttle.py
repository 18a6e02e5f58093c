"""LoginThrottle: growing waits per pair, address and account, never a lockout."""

from __future__ import annotations

import pytest

from moorage.auth.throttle import Limit, LoginThrottle, ThrottlePolicy
from moorage.errors import TooManyRequestsError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(throttle: LoginThrottle, times: int, login: str, address: str) -> None:
    for _ in range(times):
        throttle.failed(login, address)


def wait_of(throttle: LoginThrottle, login: str, address: str) -> int:
    """Return the Retry-After the throttle asks for, 0 when a login may go ahead."""
    try:
        throttle.check(login, address)
    except TooManyRequestsError as error:
        return error.retry_after
    return 0


def test_pair_free_failures_then_wait() -> None:
    """Five failures are free; the sixth makes the pair wait."""
    throttle = LoginThrottle(clock=Clock())
    fail(throttle, 5, "alice", "192.0.2.1")
    assert wait_of(throttle, "alice", "192.0.2.1") == 2
    fail(throttle, 1, "alice", "192.0.2.1")
    assert wait_of(throttle, "alice", "192.0.2.1") == 3


def test_pair_wait_grows_and_caps() -> None:
    """Each further failure doubles the wait, up to the pair's cap of 5 minutes."""
    policy = ThrottlePolicy(address=Limit(free_failures=1000, max_delay=900))
    throttle = LoginThrottle(policy, clock=Clock())
    fail(throttle, 8, "alice", "192.0.2.1")
    assert wait_of(throttle, "alice", "192.0.2.1") == 2**3 + 1
    fail(throttle, 30, "alice", "192.0.2.1")
    assert wait_of(throttle, "alice", "192.0.2.1") == 301


def test_wait_ends() -> None:
    """After the wait the next attempt may go ahead: there is no permanent lock."""
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    fail(throttle, 40, "alice", "192.0.2.1")
    clock.now += 900
    assert wait_of(throttle, "alice", "192.0.2.1") == 0


def test_pair_does_not_block_others() -> None:
    """A guesser at one address does not slow the same account elsewhere."""
    throttle = LoginThrottle(clock=Clock())
    fail(throttle, 10, "acme+ci", "198.51.100.7")
    assert wait_of(throttle, "acme+ci", "192.0.2.1") == 0
    assert wait_of(throttle, "bob", "192.0.2.1") == 0


def test_address_limit_spans_logins() -> None:
    """One address trying many names waits after 20 failures in all."""
    throttle = LoginThrottle(clock=Clock())
    for index in range(21):
        throttle.failed(f"user{index}", "198.51.100.7")
    assert wait_of(throttle, "someone-else", "198.51.100.7") > 0
    assert wait_of(throttle, "someone-else", "192.0.2.1") == 0


def test_account_limit_spares_known_addresses() -> None:
    """Failures spread over many addresses slow an account, but not from the
    addresses where it logged in before."""
    policy = ThrottlePolicy(account=Limit(free_failures=10, max_delay=300))
    throttle = LoginThrottle(policy, clock=Clock())
    throttle.succeeded("acme+ci", "192.0.2.10")
    for index in range(12):
        throttle.failed("acme+ci", f"203.0.113.{index}")
    assert wait_of(throttle, "acme+ci", "203.0.113.200") > 0
    assert wait_of(throttle, "acme+ci", "192.0.2.10") == 0


def test_success_clears_pair() -> None:
    """A successful login resets the pair's count of failures."""
    throttle = LoginThrottle(clock=Clock())
    fail(throttle, 4, "alice", "192.0.2.1")
    throttle.succeeded("alice", "192.0.2.1")
    fail(throttle, 4, "alice", "192.0.2.1")
    assert wait_of(throttle, "alice", "192.0.2.1") == 0


def test_failures_forgotten_after_an_hour() -> None:
    """Counters start again an hour after their last failure."""
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    fail(throttle, 5, "alice", "192.0.2.1")
    clock.now += 3601
    fail(throttle, 1, "alice", "192.0.2.1")
    assert wait_of(throttle, "alice", "192.0.2.1") == 0


def test_memory_bounded() -> None:
    """The throttle keeps at most max_entries counters."""
    throttle = LoginThrottle(ThrottlePolicy(max_entries=50), clock=Clock())
    for index in range(200):
        throttle.failed(f"user{index}", f"192.0.2.{index % 250}")
    assert len(throttle._counters) <= 50


@pytest.mark.parametrize("address", [None, "192.0.2.1"])
def test_retry_after_header(address: str | None) -> None:
    """The error carries a Retry-After header in whole seconds."""
    throttle = LoginThrottle(clock=Clock())
    fail(throttle, 6, "alice", address or "-")
    with pytest.raises(TooManyRequestsError) as raised:
        throttle.check("alice", address)
    assert raised.value.headers == {"Retry-After": str(raised.value.retry_after)}
