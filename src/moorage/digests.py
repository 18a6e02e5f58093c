"""Content digests: parsing, validation and incremental hashing."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from moorage.errors import DigestInvalidError, UnsupportedError

_DIGEST_PATTERN = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")

# Registered algorithms and the length of their lowercase hex encoding.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
CANONICAL_ALGORITHM = "sha256"


@dataclass(frozen=True, slots=True)
class Digest:
    """A parsed `algorithm:hex` content digest."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(value: str) -> Digest:
    """Parse and validate a digest; raise DigestInvalidError or UnsupportedError."""
    match = _DIGEST_PATTERN.fullmatch(value)
    if not match:
        raise DigestInvalidError(
            "invalid digest format", detail={"digest": value[:200]}
        )
    algorithm, encoded = match.groups()
    expected_length = ALGORITHMS.get(algorithm)
    if expected_length is None:
        raise UnsupportedError(
            f"digest algorithm {algorithm!r} is not supported; use sha256 or sha512",
            detail={"digest": value[:200]},
        )
    if len(encoded) != expected_length or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise DigestInvalidError(
            f"invalid {algorithm} digest: expected {expected_length} lowercase hex "
            "characters",
            detail={"digest": value[:200]},
        )
    return Digest(algorithm, encoded)


def is_digest(reference: str) -> bool:
    """Tell whether a manifest reference is a digest rather than a tag."""
    return ":" in reference


def new_hasher(algorithm: str) -> Any:
    """Return a fresh hashlib object for a registered algorithm."""
    return hashlib.new(algorithm)


def digest_of(data: bytes, algorithm: str = CANONICAL_ALGORITHM) -> Digest:
    """Return the digest of a byte string."""
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
