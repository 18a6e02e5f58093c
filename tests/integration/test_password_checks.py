"""Concurrent password logins share argon2id work and stay within its bound."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from argon2 import PasswordHasher

from moorage.auth import authenticator
from moorage.errors import UnauthorizedError
from moorage.services import Services
from tests.support.server import ServerProcess

LOGINS = 16
# The signature of verify_password: stored hash (None for the dummy), password.
VerifyPassword = Callable[[str | None, str], bool]


@dataclass
class VerifyCounter:
    """Counts argon2id verifications and the most that ran at the same time."""

    total: int = 0
    running: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: threading.Event = field(default_factory=threading.Event)

    def wrap(self, verify: VerifyPassword) -> VerifyPassword:
        def counting_verify(stored: str | None, given: str) -> bool:
            with self.lock:
                self.total += 1
                self.running += 1
                self.peak = max(self.peak, self.running)
            self.started.set()
            try:
                return verify(stored, given)
            finally:
                with self.lock:
                    self.running -= 1

        return counting_verify


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> VerifyCounter:
    counter = VerifyCounter()
    monkeypatch.setattr(
        authenticator, "verify_password", counter.wrap(authenticator.verify_password)
    )
    return counter


def test_same_credentials_verified_once(
    server: ServerProcess, counter: VerifyCounter
) -> None:
    """A burst of logins with the same credentials runs argon2id once."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")

    async def burst(services: Services) -> list[str]:
        principals = await asyncio.gather(
            *(
                services.authenticator.login(login, password, f"192.0.2.{index}")
                for index in range(LOGINS)
            )
        )
        return [principal.login for principal in principals]

    assert server.run_admin(burst) == [login] * LOGINS
    assert counter.total == 1


def test_wrong_password_burst_verified_once(
    server: ServerProcess, counter: VerifyCounter
) -> None:
    """Concurrent logins with the same wrong password share one check, and each
    of them fails."""
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")

    async def burst(services: Services) -> list[BaseException | object]:
        return await asyncio.gather(
            *(
                services.authenticator.login(login, "wrong-password-1234")
                for _ in range(4)
            ),
            return_exceptions=True,
        )

    results = server.run_admin(burst)
    assert all(isinstance(result, UnauthorizedError) for result in results)
    assert counter.total == 1


def test_different_users_within_bound(
    server: ServerProcess, counter: VerifyCounter
) -> None:
    """Logins of different users each run argon2id, never more at once than the
    authenticator's bound."""
    customer = server.add_customer()
    users = [server.add_user(customer, "reader") for _ in range(6)]
    limits: list[int] = []

    async def burst(services: Services) -> None:
        limits.append(services.authenticator.max_password_checks)
        await asyncio.gather(
            *(
                services.authenticator.login(login, password)
                for login, password in users
            )
        )

    server.run_admin(burst)
    assert counter.total == len(users)
    assert counter.peak <= limits[0]
    assert counter.peak >= 1


def test_cancelled_login_leaves_check_running(
    server: ServerProcess, counter: VerifyCounter
) -> None:
    """When the first of two concurrent logins is cancelled, the second still
    gets the shared result."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")

    async def cancel_first(services: Services) -> str:
        first = asyncio.create_task(services.authenticator.login(login, password))
        second = asyncio.create_task(services.authenticator.login(login, password))
        assert await asyncio.to_thread(counter.started.wait, 30)
        first.cancel()
        principal = await second
        assert first.cancelled()
        return principal.login

    assert server.run_admin(cancel_first) == login
    assert counter.total == 1


def test_login_replaces_hash_with_other_parameters(server: ServerProcess) -> None:
    """A password hashed with other argon2id parameters still logs in, and the
    login stores a hash under the current ones without revoking tokens."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    old_hash = PasswordHasher(memory_cost=65536, time_cost=3, parallelism=4).hash(
        password
    )

    async def log_in_with_old_hash(services: Services) -> tuple[str, str, int, int]:
        access = await services.identity.account_access(login)
        assert access is not None
        await services.identity.set_secret(access.account.id, old_hash)
        before = await services.identity.account_access(login)
        assert before is not None
        principal = await services.authenticator.login(login, password)
        after = await services.identity.account_access(login)
        assert after is not None
        assert after.account.secret_hash is not None
        return (
            principal.login,
            after.account.secret_hash,
            before.account.token_generation,
            after.account.token_generation,
        )

    logged_in, stored, generation_before, generation_after = server.run_admin(
        log_in_with_old_hash
    )
    assert logged_in == login
    assert stored != old_hash
    assert stored.startswith("$argon2id$v=19$m=7168,t=5,p=1$")
    assert generation_after == generation_before

    async def log_in(services: Services) -> str:
        return (await services.authenticator.login(login, password)).login

    assert server.run_admin(log_in) == login
