"""Concurrent password logins share argon2id work and memory."""

from __future__ import annotations

import asyncio

import pytest

from moorage.auth import authenticator
from moorage.auth.authenticator import MAX_CONCURRENT_PASSWORD_CHECKS
from moorage.services import Services
from tests.support.server import ServerProcess

LOGINS = 3 * MAX_CONCURRENT_PASSWORD_CHECKS


def test_concurrent_logins_share_verification(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of logins with the same password runs argon2id at most once per
    slot, and never more than MAX_CONCURRENT_PASSWORD_CHECKS at a time."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    real_verify = authenticator.verify_password
    calls = {"total": 0, "running": 0, "peak": 0}

    def counting_verify(stored: str | None, given: str) -> bool:
        calls["total"] += 1
        calls["running"] += 1
        calls["peak"] = max(calls["peak"], calls["running"])
        try:
            return real_verify(stored, given)
        finally:
            calls["running"] -= 1

    monkeypatch.setattr(authenticator, "verify_password", counting_verify)

    async def burst(services: Services) -> None:
        await asyncio.gather(
            *(
                services.authenticator.login(login, password, f"192.0.2.{index}")
                for index in range(LOGINS)
            )
        )

    server.run_admin(burst)
    assert calls["total"] <= MAX_CONCURRENT_PASSWORD_CHECKS
    assert calls["peak"] <= MAX_CONCURRENT_PASSWORD_CHECKS
    assert calls["total"] >= 1
