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
use is checked against the account's current state like an access token, and
against the row the authenticator records for its `jti` (see
moorage.db.refresh_token_store), so that each can be revoked alone.

Signing keys rotate with an overlap window: a new key signs at once, the older
ones still verify until their `retired_at`. Every process reloads the key set
from the database every RELOAD_SECONDS, and at once (at most once a second)
when a token names a key it does not know.
"""

from __future__ import annotations

import base64
import dataclasses
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
from moorage.db.registry_store import ContentCodec

ALGORITHM = "ES256"
ISSUER = "moorage"
REFRESH_TYPE = "refresh"
RELOAD_SECONDS = 15
# Clock difference tolerated between replicas when checking exp, nbf and iat.
LEEWAY_SECONDS = 5
# Access tokens whose signature and claims were verified are kept, keyed by the
# token itself, so a client that sends one token on every request pays for one
# ES256 verification. About 2 KiB each.
VERIFIED_TOKENS = 4096


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
    # The `jti` claim.
    token_id: str = ""
    # The `aid` claim: the account's id, so that a token never passes for a
    # later account created with the same login. Tokens signed before the
    # claim existed carry none.
    account_id: int | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: str
    # The `jti` claim, and `exp` in seconds since the epoch.
    token_id: str = ""
    expires_at: int = 0


@dataclass(frozen=True, slots=True)
class _VerifiedToken:
    claims: TokenClaims
    kid: str


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
        codec: ContentCodec | None = None,
    ) -> None:
        self.service = service
        self.ttl_seconds = ttl_seconds
        self.refresh_ttl_seconds = refresh_ttl_seconds
        self._store = store
        self.codec = codec
        self._forced_at = 0.0
        self._verified: dict[str, _VerifiedToken] = {}
        self._set_keys(keys)

    def _set_keys(self, keys: list[SigningKeyRecord]) -> None:
        if not keys:
            raise ValueError("the token service needs at least one signing key")
        self._keys = [
            _load_key(open_signing_key(record, self.codec)) for record in keys
        ]
        self._by_kid = {key.kid: key for key in self._keys}
        self._loaded_at = time.monotonic()

    @classmethod
    async def load(
        cls,
        store: IdentityStore,
        service: str,
        ttl: int,
        refresh_ttl: int = 90 * 86400,
        codec: ContentCodec | None = None,
    ) -> TokenService:
        """Load the signing keys, creating the first one on a new installation.

        With a `codec`, a new private key is stored encrypted.
        """
        keys = await store.active_signing_keys()
        if not keys:
            await add_signing_key(store, overlap_seconds=None, codec=codec)
            keys = await store.active_signing_keys()
        return cls(keys, service, ttl, refresh_ttl, store, codec)

    async def reload(self, *, force: bool = False) -> None:
        """Reread the signing keys when the last read is older than RELOAD_SECONDS.

        With `force` (a token names a key this process does not know), reread at
        once, but at most once a second, so that tokens with made-up key IDs
        cannot turn every request into a database query.
        """
        if self._store is None:
            return
        now = time.monotonic()
        if force:
            if now - self._forced_at < 1:
                return
            self._forced_at = now
        elif now - self._loaded_at < RELOAD_SECONDS:
            return
        keys = await self._store.active_signing_keys()
        if keys:
            self._set_keys(keys)

    def knows_key(self, token: str) -> bool:
        if token in self._verified:
            return True
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
        *,
        account_id: int | None = None,
    ) -> IssuedToken:
        claims: dict[str, Any] = {
            "access": [scope.to_claim() for scope in access],
        }
        return self._sign(
            subject, generation, personal_token_id, self.ttl_seconds, claims, account_id
        )

    def issue_refresh(
        self,
        subject: str,
        generation: int,
        personal_token_id: int | None = None,
        *,
        account_id: int | None = None,
    ) -> IssuedToken:
        """Issue an OAuth2 refresh token for the account (typ "refresh")."""
        return self._sign(
            subject,
            generation,
            personal_token_id,
            self.refresh_ttl_seconds,
            {"typ": REFRESH_TYPE},
            account_id,
        )

    def _sign(
        self,
        subject: str,
        generation: int,
        personal_token_id: int | None,
        ttl: int,
        extra: dict[str, Any],
        account_id: int | None,
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
            # Hex, so that an id never starts with "-" on a command line.
            "jti": secrets.token_hex(16),
            "gen": generation,
            **extra,
        }
        if personal_token_id is not None:
            claims["pat"] = personal_token_id
        if account_id is not None:
            claims["aid"] = account_id
        token = jwt.encode(
            claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid}
        )
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return IssuedToken(token, ttl, issued, claims["jti"], claims["exp"])

    def verify(self, token: str) -> TokenClaims:
        """Verify an access token: signature, algorithm, audience, issuer, lifetime.

        A token verified before is checked again only for its lifetime and for
        its signing key, which must still be loaded and not retired.
        """
        verified = self._verified.get(token)
        if verified is not None and self._still_valid(verified):
            return verified.claims
        claims = self._decode(token)
        if claims.get("typ") is not None:
            raise InvalidTokenError("not an access token")
        result = _claims(claims, _access_map(claims.get("access")))
        self._remember(token, result)
        return result

    def _still_valid(self, verified: _VerifiedToken) -> bool:
        key = self._by_kid.get(verified.kid)
        now = time.time()
        return (
            key is not None
            and (key.retired_at is None or key.retired_at > now)
            and verified.claims.expires_at + LEEWAY_SECONDS > now
        )

    def _remember(self, token: str, claims: TokenClaims) -> None:
        kid = str(jwt.get_unverified_header(token).get("kid"))
        self._verified[token] = _VerifiedToken(claims, kid)
        if len(self._verified) > VERIFIED_TOKENS:
            # Dicts keep insertion order: drop the oldest entry.
            del self._verified[next(iter(self._verified))]

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


async def add_signing_key(
    store: IdentityStore,
    overlap_seconds: int | None,
    codec: ContentCodec | None = None,
) -> str:
    """Create a new signing key that signs from now on; the keys in use before
    keep verifying for `overlap_seconds` (None: until retired later). Return the
    new key's ID. With a `codec`, the private key is stored encrypted."""
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
    await store.add_signing_key(
        kid, ALGORITHM, _seal_pem(pem, kid, codec), retire_others_at=retire_at
    )
    return kid


def _claims(
    claims: dict[str, Any], access: dict[tuple[str, str], frozenset[str]]
) -> TokenClaims:
    personal_token = claims.get("pat")
    account_id = claims.get("aid")
    return TokenClaims(
        subject=str(claims["sub"]),
        generation=int(claims.get("gen", -1)),
        access=access,
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
        personal_token_id=(
            int(personal_token) if isinstance(personal_token, int) else None
        ),
        token_id=str(claims.get("jti", "")),
        account_id=account_id if isinstance(account_id, int) else None,
    )


_SEALED_PREFIX = "sealed:"


def _seal_pem(pem: str, kid: str, codec: ContentCodec | None) -> str:
    if codec is None:
        return pem
    sealed = codec.seal(pem.encode(), f"signing-key:{kid}")
    if not codec.is_sealed(sealed):
        return pem
    return _SEALED_PREFIX + base64.b64encode(sealed).decode()


async def seal_signing_keys(store: IdentityStore, codec: ContentCodec) -> int:
    """Seal every private key stored as a PEM, retired ones included, as new
    keys are stored; return how many were sealed.

    Keys created while encryption was off are stored as PEMs. A row that
    another process changed meanwhile is left to it, so concurrent runs are
    safe, and a second run finds nothing to do.
    """
    sealed = 0
    for record in await store.list_signing_keys():
        if record.private_key.startswith(_SEALED_PREFIX):
            continue
        stored = _seal_pem(record.private_key, record.kid, codec)
        if stored == record.private_key:
            return 0  # encryption of new data is off
        if await store.replace_private_key(record.kid, record.private_key, stored):
            sealed += 1
    return sealed


def open_signing_key(
    record: SigningKeyRecord, codec: ContentCodec | None
) -> SigningKeyRecord:
    """Return the record with its private key decrypted when it was stored sealed."""
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
