"""The token service's signing keys and JWTs (CNCF distribution token format).

Tokens are ES256 JWTs with the claims the distribution token specification
lists (iss, sub, aud, exp, nbf, iat, jti, access) plus `gen`, the account's token
generation, which lets a secret rotation reject older tokens at once. The `kid`
is the libtrust key ID that the CNCF distribution registry computes for a key,
so that registry can verify these tokens from the JWKS or a certificate.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage.auth.scope import Scope
from moorage.db.identity_store import IdentityStore, SigningKeyRecord
from moorage.db.registry_store import ContentCodec

ALGORITHM = "ES256"
ISSUER = "moorage"


class InvalidTokenError(Exception):
    """A bearer token failed verification: signature, claims or format."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    generation: int
    access: dict[tuple[str, str], frozenset[str]]
    issued_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: str


@dataclass(frozen=True, slots=True)
class _SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    public_key: ec.EllipticCurvePublicKey


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Return the key ID libtrust derives: base32 of a SPKI hash, in groups of 4."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[index : index + 4] for index in range(0, 48, 4))


class TokenService:
    """Issues and verifies registry access tokens."""

    def __init__(self, keys: list[SigningKeyRecord], service: str, ttl_seconds: int):
        if not keys:
            raise ValueError("the token service needs at least one signing key")
        self.service = service
        self.ttl_seconds = ttl_seconds
        self._keys = [_load_key(record) for record in keys]
        self._by_kid = {key.kid: key for key in self._keys}

    @classmethod
    async def load(
        cls,
        store: IdentityStore,
        service: str,
        ttl: int,
        codec: ContentCodec | None = None,
    ) -> TokenService:
        """Load the signing keys, creating the first one on a new installation.

        With a `codec`, a new private key is stored encrypted.
        """
        keys = await store.active_signing_keys()
        if not keys:
            private_key = ec.generate_private_key(ec.SECP256R1())
            pem = private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
            kid = libtrust_key_id(private_key.public_key())
            await store.add_signing_key(kid, ALGORITHM, _seal_pem(pem, kid, codec))
            keys = await store.active_signing_keys()
        return cls([_open_pem(record, codec) for record in keys], service, ttl)

    def issue(self, subject: str, generation: int, access: list[Scope]) -> IssuedToken:
        key = self._keys[0]
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.ttl_seconds,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "access": [scope.to_claim() for scope in access],
            "gen": generation,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid}
        )
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return IssuedToken(token, self.ttl_seconds, issued)

    def verify(self, token: str) -> TokenClaims:
        """Verify signature, algorithm, audience, issuer and lifetime."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidTokenError(f"malformed token: {error}") from None
        key = self._by_kid.get(str(header.get("kid")))
        if key is None:
            raise InvalidTokenError("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=[ALGORITHM],
                audience=self.service,
                issuer=ISSUER,
                options={"require": ["exp", "nbf", "iat", "sub", "aud", "iss"]},
                leeway=5,
            )
        except jwt.PyJWTError as error:
            raise InvalidTokenError(str(error)) from None
        return TokenClaims(
            subject=str(claims["sub"]),
            generation=int(claims.get("gen", -1)),
            access=_access_map(claims.get("access")),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
        )

    def jwks(self) -> dict[str, Any]:
        """Return the public keys as a JSON Web Key Set."""
        keys = []
        for key in self._keys:
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key, as_dict=True)
            keys.append({**jwk, "kid": key.kid, "use": "sig", "alg": ALGORITHM})
        return {"keys": keys}


_SEALED_PREFIX = "sealed:"


def _seal_pem(pem: str, kid: str, codec: ContentCodec | None) -> str:
    if codec is None:
        return pem
    sealed = codec.seal(pem.encode(), f"signing-key:{kid}")
    if not codec.is_sealed(sealed):
        return pem
    return _SEALED_PREFIX + base64.b64encode(sealed).decode()


def _open_pem(record: SigningKeyRecord, codec: ContentCodec | None) -> SigningKeyRecord:
    if not record.private_key.startswith(_SEALED_PREFIX):
        return record
    if codec is None:
        raise ValueError(
            f"signing key {record.kid} is encrypted but no encryption key is set up"
        )
    sealed = base64.b64decode(record.private_key.removeprefix(_SEALED_PREFIX))
    pem = codec.open(sealed, f"signing-key:{record.kid}").decode()
    return dataclasses.replace(record, private_key=pem)


def _load_key(record: SigningKeyRecord) -> _SigningKey:
    private_key = serialization.load_pem_private_key(record.private_key.encode(), None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"signing key {record.kid} is not an EC key")
    return _SigningKey(record.kid, private_key, private_key.public_key())


def _access_map(claim: Any) -> dict[tuple[str, str], frozenset[str]]:
    if not isinstance(claim, list):
        raise InvalidTokenError("token has no access claim")
    access: dict[tuple[str, str], frozenset[str]] = {}
    for entry in claim:
        if not isinstance(entry, dict):
            raise InvalidTokenError("malformed access claim")
        key = (str(entry.get("type")), str(entry.get("name")))
        actions = entry.get("actions") or []
        access[key] = access.get(key, frozenset()) | frozenset(map(str, actions))
    return access
