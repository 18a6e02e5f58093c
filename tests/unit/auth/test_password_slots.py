"""argon2id computations never exceed ARGON2_SLOTS at once, in one process
and across the server's forked worker processes."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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


def test_slots_are_half_the_usable_cores() -> None:
    """One computation runs one thread; half the cores, and at least one, may
    compute at once."""
    assert secrets._hasher.parallelism == 1
    assert max(1, secrets.usable_cpu_count() // 2) == secrets.ARGON2_SLOTS


def test_hashes_use_current_parameters() -> None:
    """New hashes need no rehash; hashes with other parameters or of another
    kind are told apart."""
    fresh = secrets.hash_password("correct horse battery")
    assert not secrets.needs_rehash(fresh)
    assert secrets.needs_rehash(PasswordHasher().hash("correct horse battery"))
    assert not secrets.needs_rehash(secrets.KEYED_HASH_PREFIX + "00" * 32)


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


def _hash_in_child(started: Any, running: Any, peak: Any) -> None:
    """Hash once while counting, in `running` and `peak`, the processes that
    hold an argon2id slot at the same time."""
    started.wait()

    class SharedCountingHasher(PasswordHasher):
        def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
            with running.get_lock():
                running.value += 1
                peak.value = max(peak.value, running.value)
            time.sleep(0.05)  # long enough for unbounded processes to overlap
            try:
                return super().hash(password, salt=salt)
            finally:
                with running.get_lock():
                    running.value -= 1

    secrets._hasher = SharedCountingHasher(time_cost=1, memory_cost=8, parallelism=1)
    secrets.hash_password("pw")
    os._exit(0)


def test_slots_are_shared_by_forked_processes() -> None:
    """Worker processes forked from the server share the slots: together they
    run at most ARGON2_SLOTS computations at once."""
    context = multiprocessing.get_context("fork")
    started = context.Event()
    running = context.Value("i", 0)
    peak = context.Value("i", 0)
    children = [
        context.Process(target=_hash_in_child, args=(started, running, peak))
        for _ in range(secrets.ARGON2_SLOTS + 3)
    ]
    for child in children:
        child.start()
    started.set()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert 1 <= peak.value <= secrets.ARGON2_SLOTS
