"""Signed checkpoints: "event N has hash H", signed with the token signing key.

A checkpoint is a compact JWS (ES256, the algorithm of the registry's token
signing keys) whose payload holds the event's sequence number and hash. With the
public keys (the JWKS that `/token/jwks` serves, also written into every export)
an auditor can check an exported range without access to the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage.audit.events import format_time, parse_time

ALGORITHM = "ES256"
ISSUER = "moorage-audit"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    time: datetime
    kid: str
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "time": format_time(self.time),
            "kid": self.kid,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(
            int(data["seq"]),
            str(data["hash"]),
            parse_time(str(data["time"])),
            str(data["kid"]),
            str(data["signature"]),
        )


class CheckpointSigner:
    """Signs checkpoints with one private key (PEM, P-256)."""

    def __init__(self, kid: str, private_key_pem: str) -> None:
        key = serialization.load_pem_private_key(private_key_pem.encode(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"signing key {kid} is not an EC key")
        self.kid = kid
        self._key = key

    def sign(self, seq: int, event_hash: str, time: datetime) -> Checkpoint:
        payload = {
            "iss": ISSUER,
            "seq": seq,
            "hash": event_hash,
            "iat": int(time.timestamp()),
        }
        token = jwt.encode(
            payload, self._key, algorithm=ALGORITHM, headers={"kid": self.kid}
        )
        return Checkpoint(seq, event_hash, time, self.kid, token)

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}]}


class CheckpointVerifier:
    """Checks checkpoint signatures against a JSON Web Key Set."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self._keys: dict[str, Any] = {}
        for entry in jwks.get("keys", []):
            self._keys[str(entry.get("kid"))] = jwt.algorithms.ECAlgorithm.from_jwk(
                entry
            )

    def check(self, checkpoint: Checkpoint) -> str | None:
        """Return what is wrong with the checkpoint, or None when it is valid."""
        key = self._keys.get(checkpoint.kid)
        if key is None:
            return f"signed with unknown key {checkpoint.kid}"
        try:
            payload = jwt.decode(
                checkpoint.signature,
                key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["seq", "hash", "iss"]},
            )
        except jwt.PyJWTError as error:
            return f"invalid signature: {error}"
        if payload["seq"] != checkpoint.seq or payload["hash"] != checkpoint.hash:
            return "the signed sequence number or hash differs from the stored one"
        return None
