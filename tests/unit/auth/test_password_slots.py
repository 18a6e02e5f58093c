"""argon2id computations in one process never exceed one per usable core."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from argon2 import PasswordHasher

from moorage.auth import secrets


class CountingHasher(PasswordHasher):
    """A cheap argon2id hasher that records how many calls overlap."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def _enter(self) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        # Long enough that unbounded calls overlap.
        time.sleep(0.02)

    def _leave(self) -> None:
        with self.lock:
            self.running -= 1

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self._enter()
        try:
            return super().hash(password, salt=salt)
        finally:
            self._leave()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self._enter()
        try:
            return super().verify(hash, password)
        finally:
            self._leave()


@pytest.fixture
def hasher(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingHasher]:
    counting = CountingHasher()
    monkeypatch.setattr(secrets, "_hasher", counting)
    secrets._dummy_hash.cache_clear()
    yield counting
    # A dummy hash made with the cheap parameters would make later checks of
    # unknown accounts in this process fast.
    secrets._dummy_hash.cache_clear()


def test_slots_match_usable_cores() -> None:
    assert secrets.usable_cpu_count() == secrets.ARGON2_SLOTS
    assert secrets.ARGON2_SLOTS >= 1


def test_hashes_within_slots(hasher: CountingHasher) -> None:
    """Concurrent hashes and verifications run at most ARGON2_SLOTS at a time."""
    stored = secrets.hash_password("correct horse battery")
    calls = 4 * secrets.ARGON2_SLOTS + 2
    with ThreadPoolExecutor(max_workers=calls) as pool:
        hashes = list(pool.map(secrets.hash_password, ["pw"] * calls))
        checks = list(
            pool.map(
                secrets.verify_password,
                [stored] * calls,
                ["correct horse battery"] * calls,
            )
        )
    assert len(set(hashes)) == calls
    assert all(checks)
    assert hasher.peak <= secrets.ARGON2_SLOTS
    assert hasher.peak >= 1


def test_unknown_account_check_fails(hasher: CountingHasher) -> None:
    """The dummy check for an unknown account runs argon2id and fails."""
    assert not secrets.verify_password(None, "anything")
    assert hasher.peak == 1
