"""The argon2id parameters of password hashes.

A module of its own, importing only argon2-cffi, so that `moorage.supervisor`
can hash and verify for the worker processes without the application (see
`moorage.auth.password_service`).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# One of the parameter sets that OWASP's Password Storage Cheat Sheet lists as
# equal in defence: 7 MiB, 5 passes, 1 lane. Its 19 MiB and 2 passes cost about
# the same CPU time (29 ms against 24 ms per check here), but every check adds
# its memory to the peak resident memory of the process that runs it, which the
# benchmark holds under 150 MiB (docs/benchmarks.md, item 47). argon2-cffi's
# default, RFC 9106's second profile (64 MiB, 3 passes, 4 lanes), measured 8
# times the CPU time per check here. Hashes made with other parameters still
# verify, and the next successful login replaces them (see
# moorage.auth.secrets.needs_rehash).
HASHER = PasswordHasher(memory_cost=7 * 1024, time_cost=5, parallelism=1)


def matches(hasher: PasswordHasher, password_hash: str, password: str) -> bool:
    """Tell whether `password` matches `password_hash`; a malformed hash fails."""
    try:
        return hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
