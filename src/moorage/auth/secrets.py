"""Password hashing and generated secrets."""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# argon2-cffi's defaults are RFC 9106's second recommended profile (argon2id,
# 64 MiB, 3 passes), which keeps a verification near 50 ms on a server core.
_hasher = PasswordHasher()
# Verified against when a login name is unknown, so that a failed login takes
# the same time whether or not the account exists.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

# 24 random bytes give 192 bits of entropy; the brief asks for at least 128.
GENERATED_SECRET_BYTES = 24


def generate_secret() -> str:
    return secrets.token_urlsafe(GENERATED_SECRET_BYTES)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check a password; with `password_hash` None, spend the same time and fail."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and (
            password_hash is not None
        )
    except (VerificationError, InvalidHashError):
        return False
