"""The token service's signing keys and JWTs (CNCF distribution token format).

Access tokens are ES256 JWTs with the claims the distribution token
specification lists (iss, sub, aud, exp, nbf, iat, jti, access). Two claims are
added: `gen`, the account's token generation, which lets a secret rotation
reject older tokens at once, and `pat`, the personal access token a login used.
The `kid` is the libtrust key ID that the CNCF distribution registry computes
for a key, so that registry can verify these tokens from the JWKS or a
certificate.

Refresh tokens (OAuth2, for `offline_token=true` and the POST form) are JWTs of
the same keys with `typ` "refresh", no `access` claim, and a long lifetime; each
use is checked against the account's current state like an access token.

Signing keys rotate with an overlap window: a new key signs at once, the older
ones still verify until their `retired_at`. Every process reloads the key set
from the database every RELOAD_SECONDS, and at once (at most once a second)
when a token names a key it does not know.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage.auth.scope import Scope
from moorage.db.identity_store import IdentityStore, SigningKeyRecord

ALGORITHM = "ES256"
ISSUER = "moorage"
REFRESH_TYPE = "refresh"
RELOAD_SECONDS = 15
# Clock difference tolerated between replicas when checking exp, nbf and iat.
LEEWAY_SECONDS = 5


class InvalidTokenError(Exception):
    """A bearer token failed verification: signature, claims or format."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    generation: int
    access: dict[tuple[str, str], frozenset[str]]
    issued_at: int
    expires_at: int
    personal_token_id: int | None = None


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
    retired_at: float | None


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Return the key ID libtrust derives: base32 of a SPKI hash, in groups of 4."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[index : index + 4] for index in range(0, 48, 4))


class TokenService:
    """Issues and verifies registry access tokens and refresh tokens."""

    def __init__(
        self,
        keys: list[SigningKeyRecord],
        service: str,
        ttl_seconds: int,
        refresh_ttl_seconds: int = 90 * 86400,
        store: IdentityStore | None = None,
    ) -> None:
        self.service = service
        self.ttl_seconds = ttl_seconds
        self.refresh_ttl_seconds = refresh_ttl_seconds
        self._store = store
        self._set_keys(keys)

    def _set_keys(self, keys: list[SigningKeyRecord]) -> None:
        if not keys:
            raise ValueError("the token service needs at least one signing key")
        self._keys = [_load_key(record) for record in keys]
        self._by_kid = {key.kid: key for key in self._keys}
        self._loaded_at = time.monotonic()

    @classmethod
    async def load(
        cls,
        store: IdentityStore,
        service: str,
        ttl: int,
        refresh_ttl: int = 90 * 86400,
    ) -> TokenService:
        """Load the signing keys, creating the first one on a new installation."""
        keys = await store.active_signing_keys()
        if not keys:
            await add_signing_key(store, overlap_seconds=None)
            keys = await store.active_signing_keys()
        return cls(keys, service, ttl, refresh_ttl, store)

    async def reload(self, *, force: bool = False) -> None:
        """Reread the signing keys when the last read is older than RELOAD_SECONDS;
        with `force`, when it is older than a second."""
        if self._store is None:
            return
        age = time.monotonic() - self._loaded_at
        if age < (1 if force else RELOAD_SECONDS):
            return
        keys = await self._store.active_signing_keys()
        if keys:
            self._set_keys(keys)

    def knows_key(self, token: str) -> bool:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return True  # malformed: reloading would not help
        return str(header.get("kid")) in self._by_kid

    def issue(
        self,
        subject: str,
        generation: int,
        access: list[Scope],
        personal_token_id: int | None = None,
    ) -> IssuedToken:
        claims: dict[str, Any] = {
            "access": [scope.to_claim() for scope in access],
        }
        return self._sign(
            subject, generation, personal_token_id, self.ttl_seconds, claims
        )

    def issue_refresh(
        self, subject: str, generation: int, personal_token_id: int | None = None
    ) -> IssuedToken:
        """Issue an OAuth2 refresh token for the account (typ "refresh")."""
        return self._sign(
            subject,
            generation,
            personal_token_id,
            self.refresh_ttl_seconds,
            {"typ": REFRESH_TYPE},
        )

    def _sign(
        self,
        subject: str,
        generation: int,
        personal_token_id: int | None,
        ttl: int,
        extra: dict[str, Any],
    ) -> IssuedToken:
        key = self._keys[0]
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": subject,
            "aud": self.service,
            "exp": now + ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "gen": generation,
            **extra,
        }
        if personal_token_id is not None:
            claims["pat"] = personal_token_id
        token = jwt.encode(
            claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid}
        )
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return IssuedToken(token, ttl, issued)

    def verify(self, token: str) -> TokenClaims:
        """Verify an access token: signature, algorithm, audience, issuer, lifetime."""
        claims = self._decode(token)
        if claims.get("typ") is not None:
            raise InvalidTokenError("not an access token")
        return _claims(claims, _access_map(claims.get("access")))

    def verify_refresh(self, token: str) -> TokenClaims:
        """Verify a refresh token the same way; it must carry typ "refresh"."""
        claims = self._decode(token)
        if claims.get("typ") != REFRESH_TYPE:
            raise InvalidTokenError("not a refresh token")
        return _claims(claims, {})

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidTokenError(f"malformed token: {error}") from None
        key = self._by_kid.get(str(header.get("kid")))
        if key is None:
            raise InvalidTokenError("token signed with an unknown key")
        if key.retired_at is not None and key.retired_at <= time.time():
            raise InvalidTokenError("token signed with a retired key")
        try:
            return jwt.decode(
                token,
                key.public_key,
                algorithms=[ALGORITHM],
                audience=self.service,
                issuer=ISSUER,
                options={
                    "require": ["exp", "nbf", "iat", "sub", "aud", "iss"],
                    "verify_iat": True,
                },
                leeway=LEEWAY_SECONDS,
            )
        except jwt.PyJWTError as error:
            raise InvalidTokenError(str(error)) from None

    def jwks(self) -> dict[str, Any]:
        """Return the public keys as a JSON Web Key Set."""
        keys = []
        for key in self._keys:
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key, as_dict=True)
            keys.append({**jwk, "kid": key.kid, "use": "sig", "alg": ALGORITHM})
        return {"keys": keys}


async def add_signing_key(store: IdentityStore, overlap_seconds: int | None) -> str:
    """Create a new signing key that signs from now on; the keys in use before
    keep verifying for `overlap_seconds` (None: until retired later). Return the
    new key's ID."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    kid = libtrust_key_id(private_key.public_key())
    retire_at = (
        None
        if overlap_seconds is None
        else datetime.now(UTC) + timedelta(seconds=overlap_seconds)
    )
    await store.add_signing_key(kid, ALGORITHM, pem, retire_others_at=retire_at)
    return kid


def _claims(
    claims: dict[str, Any], access: dict[tuple[str, str], frozenset[str]]
) -> TokenClaims:
    personal_token = claims.get("pat")
    return TokenClaims(
        subject=str(claims["sub"]),
        generation=int(claims.get("gen", -1)),
        access=access,
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
        personal_token_id=(
            int(personal_token) if isinstance(personal_token, int) else None
        ),
    )


def _load_key(record: SigningKeyRecord) -> _SigningKey:
    private_key = serialization.load_pem_private_key(record.private_key.encode(), None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"signing key {record.kid} is not an EC key")
    retired_at = record.retired_at.timestamp() if record.retired_at else None
    return _SigningKey(record.kid, private_key, private_key.public_key(), retired_at)


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
