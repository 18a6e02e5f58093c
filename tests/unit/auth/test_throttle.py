"""LoginThrottle: growing waits per pair, address and account, never a lockout.

The throttle keeps its counters in a real metadata database (SQLite, or
PostgreSQL with MOORAGE_TEST_DATABASE=postgresql); a fake clock drives time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moorage.auth.throttle import Limit, LoginThrottle, ThrottlePolicy
from moorage.db.engine import create_engine, migrate
from moorage.db.login_failure_store import (
    ACCOUNT,
    PAIR,
    LoginFailureStore,
    counter_keys,
)
from moorage.errors import TooManyRequestsError
from tests.support.database import create_database, drop_database


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a new, migrated metadata database."""
    url = create_database(tmp_path)
    engine = create_engine(url)
    await migrate(engine)
    await engine.dispose()
    yield url
    drop_database(url)


@pytest.fixture
async def store(database: str) -> AsyncIterator[LoginFailureStore]:
    engine = create_engine(database)
    yield LoginFailureStore(engine)
    await engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(store: LoginFailureStore, clock: Clock) -> LoginThrottle:
    return LoginThrottle(store, clock=clock)


async def fail(throttle: LoginThrottle, times: int, login: str, address: str) -> None:
    for _ in range(times):
        await throttle.failed(login, address)


async def wait_of(throttle: LoginThrottle, login: str, address: str) -> int:
    """Return the Retry-After the throttle requires, 0 when a login may go ahead."""
    try:
        await throttle.check(login, address)
    except TooManyRequestsError as error:
        return error.retry_after
    return 0


async def test_pair_free_failures_then_wait(throttle: LoginThrottle) -> None:
    """Five failures are free; the sixth makes the pair wait."""
    await fail(throttle, 5, "alice", "192.0.2.1")
    assert await wait_of(throttle, "alice", "192.0.2.1") == 2
    await fail(throttle, 1, "alice", "192.0.2.1")
    assert await wait_of(throttle, "alice", "192.0.2.1") == 3


async def test_pair_wait_grows_and_caps(store: LoginFailureStore, clock: Clock) -> None:
    """Each further failure doubles the wait, up to the pair's cap of 5 minutes."""
    policy = ThrottlePolicy(address=Limit(free_failures=1000, max_delay=900))
    throttle = LoginThrottle(store, policy, clock=clock)
    await fail(throttle, 8, "alice", "192.0.2.1")
    assert await wait_of(throttle, "alice", "192.0.2.1") == 2**3 + 1
    await fail(throttle, 30, "alice", "192.0.2.1")
    assert await wait_of(throttle, "alice", "192.0.2.1") == 301


async def test_wait_ends(throttle: LoginThrottle, clock: Clock) -> None:
    """After the wait the next attempt may go ahead: there is no permanent lock."""
    await fail(throttle, 40, "alice", "192.0.2.1")
    clock.now += 900
    assert await wait_of(throttle, "alice", "192.0.2.1") == 0


async def test_pair_does_not_block_others(throttle: LoginThrottle) -> None:
    """A guesser at one address does not slow the same account elsewhere."""
    await fail(throttle, 10, "acme+ci", "198.51.100.7")
    assert await wait_of(throttle, "acme+ci", "192.0.2.1") == 0
    assert await wait_of(throttle, "bob", "192.0.2.1") == 0


async def test_address_limit_spans_logins(throttle: LoginThrottle) -> None:
    """One address trying many names waits after 20 failures in all."""
    for index in range(21):
        await throttle.failed(f"user{index}", "198.51.100.7")
    assert await wait_of(throttle, "someone-else", "198.51.100.7") > 0
    assert await wait_of(throttle, "someone-else", "192.0.2.1") == 0


async def test_account_limit_spares_known_addresses(
    store: LoginFailureStore, clock: Clock
) -> None:
    """Failures spread over many addresses slow an account, but not from the
    addresses where it logged in before."""
    policy = ThrottlePolicy(account=Limit(free_failures=10, max_delay=300))
    throttle = LoginThrottle(store, policy, clock=clock)
    state = await throttle.check("acme+ci", "192.0.2.10")
    await throttle.succeeded("acme+ci", "192.0.2.10", state)
    for index in range(12):
        await throttle.failed("acme+ci", f"203.0.113.{index}")
    assert await wait_of(throttle, "acme+ci", "203.0.113.200") > 0
    assert await wait_of(throttle, "acme+ci", "192.0.2.10") == 0
    clock.now += 31 * 86400
    await fail(throttle, 12, "acme+ci", "203.0.113.1")
    assert await wait_of(throttle, "acme+ci", "192.0.2.10") > 0


async def test_success_clears_pair(throttle: LoginThrottle) -> None:
    """A successful login resets the pair's count of failures."""
    await fail(throttle, 4, "alice", "192.0.2.1")
    state = await throttle.check("alice", "192.0.2.1")
    await throttle.succeeded("alice", "192.0.2.1", state)
    await fail(throttle, 4, "alice", "192.0.2.1")
    assert await wait_of(throttle, "alice", "192.0.2.1") == 0


async def test_known_address_refreshed_daily(
    throttle: LoginThrottle, store: LoginFailureStore, clock: Clock
) -> None:
    """A success records its address as known, then rewrites that record only
    once it is a day old."""
    state = await throttle.check("alice", "192.0.2.1")
    await throttle.succeeded("alice", "192.0.2.1", state)
    first = await store.read("alice", "192.0.2.1")
    assert first.known_since == clock.now
    clock.now += 3600
    state = await throttle.check("alice", "192.0.2.1")
    await throttle.succeeded("alice", "192.0.2.1", state)
    again = await store.read("alice", "192.0.2.1")
    assert again.known_since == first.known_since
    clock.now += 86400
    state = await throttle.check("alice", "192.0.2.1")
    await throttle.succeeded("alice", "192.0.2.1", state)
    refreshed = await store.read("alice", "192.0.2.1")
    assert refreshed.known_since == clock.now


async def test_failures_forgotten_after_an_hour(
    throttle: LoginThrottle, clock: Clock
) -> None:
    """Counters start again an hour after their last failure."""
    await fail(throttle, 5, "alice", "192.0.2.1")
    clock.now += 3601
    await fail(throttle, 1, "alice", "192.0.2.1")
    assert await wait_of(throttle, "alice", "192.0.2.1") == 0


async def test_purge_keeps_active_counters(
    throttle: LoginThrottle, store: LoginFailureStore, clock: Clock
) -> None:
    """The purge deletes forgotten counters and keeps current ones."""
    await fail(throttle, 6, "old", "192.0.2.1")
    clock.now += 3000
    await fail(throttle, 6, "new", "192.0.2.2")
    clock.now += 1000
    purged = await store.purge(
        failures_before=clock.now - 3600, known_before=clock.now - 30 * 86400
    )
    assert purged == 3
    assert (await store.read("old", "192.0.2.1")).counters == {}
    assert await wait_of(throttle, "new", "192.0.2.2") == 0
    remaining = await store.list_counters(since=0)
    assert {record.key.login for record in remaining} == {"new", ""}


async def test_clear_unlocks_login(
    throttle: LoginThrottle, store: LoginFailureStore
) -> None:
    """Clearing a login name's counters ends its waits at once."""
    await fail(throttle, 8, "alice", "192.0.2.1")
    await fail(throttle, 8, "bob", "192.0.2.1")
    assert await wait_of(throttle, "alice", "192.0.2.1") > 0
    assert await store.clear("alice", None) == 2
    assert await wait_of(throttle, "alice", "192.0.2.1") == 0
    assert await wait_of(throttle, "bob", "192.0.2.1") > 0


async def test_hostile_login_names(throttle: LoginThrottle) -> None:
    """Login names with NUL characters or of any length are counted, not errors."""
    for login in ("nul\0name", "x" * 5000):
        await fail(throttle, 6, login, "192.0.2.1")
        assert await wait_of(throttle, login, "192.0.2.1") > 0


@pytest.mark.parametrize("address", [None, "192.0.2.1"])
async def test_retry_after_header(throttle: LoginThrottle, address: str | None) -> None:
    """The error carries a Retry-After header in whole seconds."""
    await fail(throttle, 6, "alice", address or "-")
    with pytest.raises(TooManyRequestsError) as raised:
        await throttle.check("alice", address)
    assert raised.value.headers == {"Retry-After": str(raised.value.retry_after)}


# Run in separate processes: each increments the same counters this many times.
_INCREMENTS = 150
_INCREMENT_SCRIPT = """
import asyncio, sys
from moorage.db.engine import create_engine
from moorage.db.login_failure_store import LoginFailureStore, counter_keys

async def main(url, count):
    engine = create_engine(url)
    store = LoginFailureStore(engine)
    for _ in range(count):
        await store.count_failure(counter_keys("alice", "192.0.2.1"), 1.0e9, 0.0)
    await engine.dispose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_concurrent_processes_lose_no_failure(
    database: str, store: LoginFailureStore
) -> None:
    """Two processes counting the same failures at once lose none of them."""
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _INCREMENT_SCRIPT,
            database,
            str(_INCREMENTS),
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for process in processes:
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    state = await store.read("alice", "192.0.2.1")
    assert state.counters[PAIR].failures == 2 * _INCREMENTS
    assert state.counters[ACCOUNT].failures == 2 * _INCREMENTS
    keys = counter_keys("alice", "192.0.2.1")
    assert [key.scope for key in keys] == ["pair", "address", "account"]
