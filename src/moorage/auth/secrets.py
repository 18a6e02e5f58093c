"""Password hashing, keyed hashes of generated secrets, and the secrets themselves.

Human passwords are stored as argon2id hashes, which make guessing slow.
Generated secrets (robot secrets, personal access tokens) carry 192 random bits,
which no guessing can cover. They are stored as HMAC-SHA256 under a server key,
so a check takes microseconds and a robot can fetch thousands of tokens per
second.

The server key lives in the database (table `server_keys`), sealed by the
database key when encryption at rest is on, so a database dump alone does not
reveal it. Without encryption it protects a leaked accounts table only, and
against a full dump the 192 bits of entropy are the protection.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import multiprocessing
import os
import secrets
import threading
from typing import Any

from argon2.exceptions import InvalidHashError

from moorage.auth import argon2id
from moorage.auth.password_service import PasswordService

_hasher = argon2id.HASHER
# Set in worker processes, whose hashes and checks the supervisor computes.
_service: PasswordService | None = None


def _shared_semaphore(value: int) -> Any:
    """Return a semaphore that forked child processes share with this one, or
    one for this process alone where the system has no shared semaphores."""
    try:
        return multiprocessing.get_context("fork").BoundedSemaphore(value)
    except (OSError, ValueError):  # no /dev/shm, or no fork on this platform
        return threading.BoundedSemaphore(value)


def usable_cpu_count() -> int:
    """Return the number of CPU cores this process may run on (at least 1)."""
    process_cpu_count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if process_cpu_count is not None:
        return process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# Every argon2id computation takes 7 MiB and a core for its duration. At most
# half the cores compute at once, so that logins leave the other half to
# serving and add at most that many times 7 MiB to memory. The bound holds
# across the server's processes, because the semaphore is created before the workers are
# forked and they share it. A worker that dies holding a slot stops the server
# (see moorage.supervisor), so a slot is never lost for good. With workers > 1
# the supervisor computes for the workers instead, with slots of its own (see
# moorage.auth.password_service); this semaphore then bounds the processes that
# hash before the workers start.
# Callers that wait on the event loop (the Authenticator) have their own bound
# as well, so that waiting logins do not hold the threads that read blobs.
ARGON2_SLOTS = max(1, usable_cpu_count() // 2)
_argon2_slots = _shared_semaphore(ARGON2_SLOTS)


# Longer than any password an account can have (moorage.admin allows 256
# characters), and short enough for a message to the supervisor's password
# service (see moorage.auth.password_service.MAX_MESSAGE_BYTES).
MAX_CHECKED_PASSWORD_LENGTH = 1024

# 24 random bytes give 192 bits of entropy, above the 128 bits that generated
# secrets must have at least.
GENERATED_SECRET_BYTES = 24
# Prefix of stored keyed hashes; argon2 hashes start with "$argon2".
KEYED_HASH_PREFIX = "hmac-sha256$"
# Name of the server key (in the database) that keys the hashes.
SECRET_HASH_KEY = "secret_hmac"  # noqa: S105 (a key's name, not a secret)
# Personal access tokens read `moorage_pat_<id>_<secret>`, so a login can find
# the token by id and tell it from a password without trying argon2id.
PERSONAL_TOKEN_PREFIX = "moorage_pat_"  # noqa: S105 (a fixed prefix, not a secret)


def generate_secret() -> str:
    return secrets.token_urlsafe(GENERATED_SECRET_BYTES)


def use_password_service(service: PasswordService) -> None:
    """Send this process's hashes and checks to the supervisor's password
    service (see moorage.auth.password_service)."""
    global _service
    _service = service


def hash_password(password: str) -> str:
    """Hash a password with argon2id, waiting while ARGON2_SLOTS others run in
    this server's processes."""
    if _service is not None:
        return _service.hash(password)
    with _argon2_slots:
        return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check a password; with `password_hash` None, spend the same time and fail.

    A password over MAX_CHECKED_PASSWORD_LENGTH fails at once: no account can
    have one. Waits while ARGON2_SLOTS other argon2id computations run."""
    if len(password) > MAX_CHECKED_PASSWORD_LENGTH:
        return False
    if _service is not None:
        return _service.verify(password_hash, password)
    checked = password_hash if password_hash is not None else _dummy_hash()
    with _argon2_slots:
        matches = argon2id.matches(_hasher, checked, password)
    return matches and password_hash is not None


def needs_rehash(password_hash: str) -> bool:
    """Tell whether an argon2id hash was made with other parameters than ours."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except InvalidHashError:
        return False


@functools.cache
def _dummy_hash() -> str:
    """Return the hash checked when a login name is unknown, so that a failed
    login takes the same time whether or not the account exists.

    Made on first use, so that a process that checks no password does not pay
    for a hash at import.
    """
    return hash_password(secrets.token_urlsafe(16))


def keyed_hash(key: bytes, secret: str) -> str:
    """Return the stored form of a generated secret: HMAC-SHA256 under `key`."""
    digest = hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()
    return KEYED_HASH_PREFIX + digest


def is_keyed_hash(stored: str) -> bool:
    return stored.startswith(KEYED_HASH_PREFIX)


def verify_keyed(key: bytes, stored: str | None, secret: str) -> bool:
    """Check a generated secret in constant time; with `stored` None, fail."""
    expected = keyed_hash(key, secret)
    return hmac.compare_digest(stored or "", expected) and stored is not None
