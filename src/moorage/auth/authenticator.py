"""Turn credentials (a password, a secret or a token) into a Principal.

A login takes one of three secrets: a user's password (argon2id), a robot's
generated secret (keyed hash), or a user's personal access token, written
`moorage_pat_<id>_<secret>`. Bearer and refresh tokens are JWTs from the token
service. Every check loads the account's current state, so disabling an
account, suspending its customer, rotating its secret, revoking a personal
access token or removing a grant takes effect on the next request. Each issued
refresh token is recorded, and a use of one whose record is missing or revoked
is rejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from datetime import UTC, datetime

import structlog

from moorage.auth.access import Grant, Principal
from moorage.auth.secrets import (
    ARGON2_SLOTS,
    PERSONAL_TOKEN_PREFIX,
    hash_password,
    is_keyed_hash,
    needs_rehash,
    verify_keyed,
    verify_password,
)
from moorage.auth.throttle import LoginThrottle
from moorage.auth.tokens import (
    InvalidTokenError,
    IssuedToken,
    TokenClaims,
    TokenService,
)
from moorage.db.identity_store import (
    AccountAccess,
    AccountRecord,
    IdentityStore,
    PersonalTokenRecord,
)
from moorage.db.login_failure_store import LoginFailureStore
from moorage.db.refresh_token_store import RefreshTokenStore
from moorage.db.schema import MAX_INTEGER_ID, utcnow
from moorage.errors import TooManyRequestsError, UnauthorizedError

log = structlog.get_logger(__name__)

# A verified password is remembered this long, so that clients which send Basic
# credentials on every request do not pay an argon2id verification each time.
# The entry is keyed by an HMAC of the credentials under a random per-process
# key, and dropped when the account's token generation changes (secret rotated
# or tokens revoked).
PASSWORD_CACHE_SECONDS = 60
PASSWORD_CACHE_ENTRIES = 10_000


def password_check_limit(workers: int) -> int:
    """Return how many argon2id verifications each of `workers` server
    processes lets wait for a slot at once: its share of ARGON2_SLOTS, the
    bound for all of them together, and at least one."""
    return max(1, ARGON2_SLOTS // workers)


class Authenticator:
    def __init__(
        self,
        identity: IdentityStore,
        tokens: TokenService,
        secret_key: bytes,
        throttle: LoginThrottle | None = None,
        refresh_tokens: RefreshTokenStore | None = None,
        max_password_checks: int | None = None,
    ) -> None:
        """`secret_key` is the server key of the keyed hashes (SECRET_HASH_KEY in
        the database); robot secrets and personal access tokens fail without it.
        At most `max_password_checks` argon2id verifications run at once (by
        default ARGON2_SLOTS); further logins wait on the event loop."""
        self.identity = identity
        self.tokens = tokens
        self.secret_key = secret_key
        self.throttle = throttle or LoginThrottle(LoginFailureStore(identity.engine))
        self.refresh_tokens = refresh_tokens or RefreshTokenStore(identity.engine)
        self._verified: OrderedDict[bytes, tuple[int, int, float]] = OrderedDict()
        self._cache_key_secret = secrets.token_bytes(32)
        self.max_password_checks = max_password_checks or ARGON2_SLOTS
        self._password_slots = asyncio.Semaphore(self.max_password_checks)
        # Verifications running now, by credentials key and stored hash. A
        # login that presents the same credentials awaits the running one.
        self._checks_in_flight: dict[tuple[bytes, str | None], asyncio.Task[bool]] = {}

    async def login(
        self, login: str, password: str, address: str | None = None
    ) -> Principal:
        """Check a login name and secret; raise UnauthorizedError on any failure,
        TooManyRequestsError while failed logins are throttled."""
        try:
            throttle_state = await self.throttle.check(login, address)
        except TooManyRequestsError as error:
            # Looking the account up in the database would cost the work that
            # the throttle exists to save. The account cache usually contains it,
            # because the failures before the throttle looked it up.
            # NOTE: a worker process that has not loaded the account since the
            # last identity change has no entry, so the event names no customer.
            error.customer = self.identity.cached_customer(login)
            raise
        access = await self.identity.account_access(login)
        account = access.account if access is not None else None
        try:
            personal_token = await self._check_secret(account, login, password)
        except UnauthorizedError as error:
            await self.throttle.failed(login, address)
            log.info("login failed", subject=login, client=address, reason=error.reason)
            # The response is the same whether or not the account exists; only
            # the audit trail learns its customer.
            error.customer = account.customer_slug if account is not None else None
            raise
        assert access is not None
        _check_usable(access.account, utcnow())
        await self.throttle.succeeded(login, address, throttle_state)
        return _principal(access, personal_token)

    async def from_certificate(self, login: str) -> Principal:
        """Load the account a verified client certificate names (its common name)."""
        access = await self.identity.account_access(login)
        if access is None:
            log.info("login failed", subject=login, reason="unknown certificate name")
            raise UnauthorizedError("client certificate names no account")
        _check_usable(access.account, utcnow())
        return _principal(access, None)

    async def from_token(self, token: str) -> tuple[Principal, TokenClaims]:
        """Verify a bearer token and load the current state of its account."""
        await self.tokens.reload(force=not self.tokens.knows_key(token))
        try:
            claims = self.tokens.verify(token)
        except InvalidTokenError as error:
            raise UnauthorizedError(f"invalid token: {error}") from None
        return await self._current(claims), claims

    async def from_refresh_token(
        self, token: str, address: str | None = None
    ) -> Principal:
        """Verify a refresh token, check its record and load its account's state.

        Records the use (time and client address) on the token's row."""
        await self.tokens.reload(force=not self.tokens.knows_key(token))
        try:
            claims = self.tokens.verify_refresh(token)
        except InvalidTokenError as error:
            raise UnauthorizedError(f"invalid refresh token: {error}") from None
        try:
            principal = await self._current(claims)
        except UnauthorizedError as error:
            # The signature is valid, so the token names its account for sure.
            error.login = claims.subject
            raise
        if not await self.refresh_tokens.redeem(
            claims.token_id, principal.account_id, address
        ):
            why = await self.refresh_tokens.refusal(
                claims.token_id, principal.account_id
            )
            # Only a revoked or expired record names the account, which makes
            # the use an alert. An unknown one may be a token issued before
            # tokens were recorded, whose clients simply log in again.
            raise UnauthorizedError(
                "refresh token is revoked, expired or unknown",
                reason=f"refresh token is {why}",
                customer=principal.customer_slug,
                login=None if why == "unknown" else principal.login,
            )
        return principal

    async def issue_refresh(
        self, principal: Principal, client_id: str | None, address: str | None
    ) -> IssuedToken:
        """Issue a refresh token for the principal and record it."""
        issued = self.tokens.issue_refresh(
            principal.login,
            principal.token_generation,
            principal.personal_token_id,
            account_id=principal.account_id,
        )
        await self.refresh_tokens.add(
            jti=issued.token_id,
            account_id=principal.account_id,
            token_generation=principal.token_generation,
            personal_token_id=principal.personal_token_id,
            client_id=client_id,
            address=address,
            issued_at=utcnow(),
            expires_at=datetime.fromtimestamp(issued.expires_at, UTC),
        )
        return issued

    async def _current(self, claims: TokenClaims) -> Principal:
        access = await self.identity.account_access(claims.subject)
        if (
            access is None
            or access.account.token_generation != claims.generation
            or (
                claims.account_id is not None and access.account.id != claims.account_id
            )
        ):
            # Name a customer only for the account the token was issued to, not
            # for a newer account that took over its login name.
            customer = None
            if access is not None and claims.account_id in (None, access.account.id):
                customer = access.account.customer_slug
            raise UnauthorizedError("token has been revoked", customer=customer)
        account = access.account
        _check_usable(account, utcnow())
        personal_token = None
        if claims.personal_token_id is not None:
            personal_token = await self.identity.get_personal_token(
                claims.personal_token_id
            )
            if personal_token is None or not _token_usable(
                personal_token, account, utcnow()
            ):
                raise UnauthorizedError(
                    _personal_token_rejection(personal_token, account),
                    customer=account.customer_slug,
                )
        return _principal(access, personal_token)

    async def _check_secret(
        self, account: AccountRecord | None, login: str, password: str
    ) -> PersonalTokenRecord | None:
        """Check a password, robot secret or personal access token against the
        account; return the personal access token, if that is what `password` is.

        Raise UnauthorizedError("invalid username or password") when it does
        not match, with a `reason` for the audit trail when the secret is right
        but revoked or expired.
        """
        if password.startswith(PERSONAL_TOKEN_PREFIX):
            return await self._personal_token(account, password)
        if account is None:
            # Spend the time a real check of this kind of login takes: robot
            # logins contain "+" and have keyed hashes, users have argon2id.
            if "+" in login:
                self._check_robot_secret(None, password)
            else:
                key = self._cache_key(login, password)
                await self._check_password(key, None, password)
            raise _invalid_credentials()
        if is_keyed_hash(account.secret_hash):
            self._check_robot_secret(account, password)
        elif not await self._password_matches(account, login, password):
            raise _invalid_credentials()
        return None

    async def _personal_token(
        self, account: AccountRecord | None, presented: str
    ) -> PersonalTokenRecord:
        """Return the personal access token `presented`; raise UnauthorizedError
        unless it is valid for account."""
        token_id, _, secret = presented.removeprefix(PERSONAL_TOKEN_PREFIX).partition(
            "_"
        )
        row_id = _personal_token_id(token_id)
        record = (
            None if row_id is None else await self.identity.get_personal_token(row_id)
        )
        stored = record.secret_hash if record is not None else None
        if not verify_keyed(self.secret_key, stored, secret):
            raise _invalid_credentials()
        assert record is not None
        if account is None or record.account_id != account.id:
            raise _invalid_credentials()
        # The secret is right, so its holder learns nothing new from these
        # reasons, but the response stays the same as for a wrong secret.
        if record.revoked_at is not None:
            raise _invalid_credentials(
                f"personal access token {record.id} ({record.name}) was revoked"
            )
        if record.expires_at is not None and record.expires_at <= utcnow():
            raise _invalid_credentials(
                f"personal access token {record.id} ({record.name}) has expired"
            )
        return record

    def _check_robot_secret(self, account: AccountRecord | None, secret: str) -> None:
        """Raise UnauthorizedError unless `secret` is the robot's current secret.

        Both the current and the previous secret's keyed hash are checked on
        every call, known robot or not, so the time taken does not tell
        whether a robot exists or was ever rotated.
        """
        current = account.secret_hash if account is not None else None
        previous = account.previous_secret_hash if account is not None else None
        matches = verify_keyed(self.secret_key, current, secret)
        matches_previous = verify_keyed(self.secret_key, previous, secret)
        if matches:
            return
        if matches_previous:
            raise _invalid_credentials(
                "old secret, revoked when the secret was rotated"
            )
        raise _invalid_credentials()

    async def _password_matches(
        self, account: AccountRecord, login: str, password: str
    ) -> bool:
        key = self._cache_key(login, password)
        if self._recently_verified(key, account):
            return True
        matches = await self._check_password(key, account.secret_hash, password)
        if matches:
            self._remember(key, account)
            if account.secret_hash is not None and needs_rehash(account.secret_hash):
                await self._rehash(account.id, account.secret_hash, password)
        return matches

    async def _rehash(self, account_id: int, stored: str, password: str) -> None:
        """Store the password's hash under the current argon2id parameters."""
        async with self._password_slots:
            rehashed = await asyncio.to_thread(hash_password, password)
        await self.identity.replace_password_hash(account_id, stored, rehashed)

    def _cache_key(self, login: str, password: str) -> bytes:
        credentials = f"{login}\0{password}".encode()
        return hmac.new(self._cache_key_secret, credentials, hashlib.sha256).digest()

    async def _check_password(
        self, key: bytes, stored: str | None, password: str
    ) -> bool:
        """Verify `password` against `stored` (None: the dummy hash), sharing the
        result with concurrent checks of the same credentials and stored hash."""
        flight = (key, stored)
        check = self._checks_in_flight.get(flight)
        if check is None:
            check = asyncio.create_task(self._run_password_check(stored, password))
            self._checks_in_flight[flight] = check
            check.add_done_callback(lambda done: self._end_flight(flight, done))
        # A caller that is cancelled (its client went away) leaves the check
        # running for the others.
        return await asyncio.shield(check)

    def _end_flight(
        self, flight: tuple[bytes, str | None], check: asyncio.Task[bool]
    ) -> None:
        if self._checks_in_flight.get(flight) is check:
            del self._checks_in_flight[flight]

    async def _run_password_check(self, stored: str | None, password: str) -> bool:
        async with self._password_slots:
            return await asyncio.to_thread(verify_password, stored, password)

    def _recently_verified(self, key: bytes, account: AccountRecord) -> bool:
        cached = self._verified.get(key)
        return (
            cached is not None
            and cached[0] == account.id
            and cached[1] == account.token_generation
            and cached[2] > time.monotonic()
        )

    def _remember(self, key: bytes, account: AccountRecord) -> None:
        expiry = time.monotonic() + PASSWORD_CACHE_SECONDS
        self._verified[key] = (account.id, account.token_generation, expiry)
        self._verified.move_to_end(key)
        while len(self._verified) > PASSWORD_CACHE_ENTRIES:
            self._verified.popitem(last=False)


def _principal(
    access: AccountAccess, personal_token: PersonalTokenRecord | None
) -> Principal:
    account = access.account
    return Principal(
        account_id=account.id,
        login=account.login,
        kind=account.kind,
        customer_id=account.customer_id,
        customer_slug=account.customer_slug,
        role=account.role,
        token_generation=account.token_generation,
        namespaces=tuple(access.namespaces),
        grants=tuple(Grant(g.pattern, g.role, g.until) for g in access.grants),
        personal_token_id=personal_token.id if personal_token else None,
        ceiling=personal_token.role if personal_token else None,
        token_repositories=personal_token.repositories if personal_token else None,
    )


def _invalid_credentials(reason: str | None = None) -> UnauthorizedError:
    return UnauthorizedError("invalid username or password", reason=reason)


def _token_usable(
    token: PersonalTokenRecord, account: AccountRecord, now: datetime
) -> bool:
    return (
        token.account_id == account.id
        and token.revoked_at is None
        and (token.expires_at is None or token.expires_at > now)
    )


def _personal_token_rejection(
    token: PersonalTokenRecord | None, account: AccountRecord
) -> str:
    """Return why a bearer token issued under a personal access token is rejected."""
    if token is not None and token.account_id == account.id and not token.revoked_at:
        return "personal access token has expired"
    return "token has been revoked"


def _check_usable(account: AccountRecord, now: datetime) -> None:
    """Raise UnauthorizedError when the account or its customer may not log in."""
    customer = account.customer_slug
    if account.disabled:
        raise UnauthorizedError("account is disabled", customer=customer)
    if account.expires_at is not None and account.expires_at <= now:
        raise UnauthorizedError("account has expired", customer=customer)
    if account.customer_id is None:
        return
    if account.customer_status != "active":
        raise UnauthorizedError("customer access is suspended", customer=customer)
    if (
        account.customer_access_until is not None
        and account.customer_access_until <= now
    ):
        raise UnauthorizedError("customer access has ended", customer=customer)


def _personal_token_id(text: str) -> int | None:
    """Return the id part of a personal access token, or None when no row can
    have it (not ASCII digits, or past the id column's range)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    row_id = int(text)
    return row_id if 1 <= row_id <= MAX_INTEGER_ID else None
