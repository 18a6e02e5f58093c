"""The argon2id parameters of password hashes.

A module of its own, importing only argon2-cffi, so that `moorage.supervisor`
can hash and verify for the worker processes without the application (see
`moorage.auth.password_service`).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# The minimum parameters of OWASP's Password Storage Cheat Sheet (19 MiB,
# 2 passes, 1 lane). argon2-cffi's default, RFC 9106's second profile (64 MiB,
# 3 passes, 4 lanes), measured 8 times the CPU time per check here and takes
# 3 times the memory, which the server pays at every password login. Hashes
# made with other parameters still verify, and the next successful login
# replaces them (see moorage.auth.secrets.needs_rehash).
HASHER = PasswordHasher(memory_cost=19 * 1024, time_cost=2, parallelism=1)


def matches(hasher: PasswordHasher, password_hash: str, password: str) -> bool:
    """Tell whether `password` matches `password_hash`; a malformed hash fails."""
    try:
        return hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
