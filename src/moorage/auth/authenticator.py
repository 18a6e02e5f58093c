"""Turn credentials (a password or a bearer token) into a Principal."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from datetime import datetime

import structlog

from moorage.auth.access import Grant, Principal
from moorage.auth.secrets import verify_password
from moorage.auth.tokens import InvalidTokenError, TokenClaims, TokenService
from moorage.db.identity_store import AccountRecord, IdentityStore
from moorage.db.schema import utcnow
from moorage.errors import UnauthorizedError

log = structlog.get_logger(__name__)

# A verified password is remembered this long, so that clients which send Basic
# credentials on every request do not pay an argon2id verification each time.
# The entry is keyed by a hash of the credentials and dropped when the account's
# token generation changes (secret rotated or tokens revoked).
PASSWORD_CACHE_SECONDS = 60
PASSWORD_CACHE_ENTRIES = 10_000


class Authenticator:
    def __init__(self, identity: IdentityStore, tokens: TokenService) -> None:
        self.identity = identity
        self.tokens = tokens
        self._verified: OrderedDict[bytes, tuple[int, int, float]] = OrderedDict()

    async def login(self, login: str, password: str) -> Principal:
        """Check a login name and password; raise UnauthorizedError on any failure."""
        account = await self.identity.find_account(login)
        if not await self._password_matches(account, login, password):
            log.info("login failed", subject=login, reason="invalid credentials")
            raise UnauthorizedError("invalid username or password")
        assert account is not None
        _check_usable(account, utcnow())
        return await self._principal(account)

    async def from_certificate(self, login: str) -> Principal:
        """Load the account a verified client certificate names (its common name)."""
        account = await self.identity.find_account(login)
        if account is None:
            log.info("login failed", subject=login, reason="unknown certificate name")
            raise UnauthorizedError("client certificate names no account")
        _check_usable(account, utcnow())
        return await self._principal(account)

    async def from_token(self, token: str) -> tuple[Principal, TokenClaims]:
        """Verify a bearer token and load the current state of its account."""
        try:
            claims = self.tokens.verify(token)
        except InvalidTokenError as error:
            raise UnauthorizedError(f"invalid token: {error}") from None
        account = await self.identity.find_account(claims.subject)
        if account is None or account.token_generation != claims.generation:
            raise UnauthorizedError("token has been revoked")
        _check_usable(account, utcnow())
        return await self._principal(account), claims

    async def _password_matches(
        self, account: AccountRecord | None, login: str, password: str
    ) -> bool:
        key = hashlib.sha256(f"{login}\0{password}".encode()).digest()
        cached = self._verified.get(key)
        if (
            account is not None
            and cached is not None
            and cached[0] == account.id
            and cached[1] == account.token_generation
            and cached[2] > time.monotonic()
        ):
            return True
        secret_hash = account.secret_hash if account is not None else None
        matches = await asyncio.to_thread(verify_password, secret_hash, password)
        if matches and account is not None:
            self._remember(key, account)
        return matches

    def _remember(self, key: bytes, account: AccountRecord) -> None:
        expiry = time.monotonic() + PASSWORD_CACHE_SECONDS
        self._verified[key] = (account.id, account.token_generation, expiry)
        self._verified.move_to_end(key)
        while len(self._verified) > PASSWORD_CACHE_ENTRIES:
            self._verified.popitem(last=False)

    async def _principal(self, account: AccountRecord) -> Principal:
        grants = await self.identity.grants_for(account.id, account.customer_id)
        namespaces = (
            await self.identity.namespaces_of(account.customer_id)
            if account.customer_id is not None
            else []
        )
        return Principal(
            account_id=account.id,
            login=account.login,
            kind=account.kind,
            customer_id=account.customer_id,
            customer_slug=account.customer_slug,
            role=account.role,
            token_generation=account.token_generation,
            namespaces=tuple(namespaces),
            grants=tuple(Grant(g.pattern, g.role, g.until) for g in grants),
        )


def _check_usable(account: AccountRecord, now: datetime) -> None:
    """Raise UnauthorizedError when the account or its customer may not log in."""
    if account.disabled:
        raise UnauthorizedError("account is disabled")
    if account.expires_at is not None and account.expires_at <= now:
        raise UnauthorizedError("account has expired")
    if account.customer_id is None:
        return
    if account.customer_status != "active":
        raise UnauthorizedError("customer access is suspended")
    if (
        account.customer_access_until is not None
        and account.customer_access_until <= now
    ):
        raise UnauthorizedError("customer access has ended")
