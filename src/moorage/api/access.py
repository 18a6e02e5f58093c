"""Authenticate each registry request and decide what it may do.

A request carries HTTP Basic credentials or a bearer token from `/token`.
Without either it gets the Docker token challenge. Then, for a repository:

- the account may take the action and the token covers it: go ahead;
- the account may take the action but the token lacks it: 401 with a challenge
  naming the scope, so the client fetches a better token;
- the account may not even pull: the caller learns nothing, so the endpoint
  responds as for a repository that does not exist (`Access.visible` is False);
- the account may pull but not take this action: 403 DENIED.

These outcomes depend on the account's rights only, never on whether the
repository exists, so no answer reveals another customer's repositories.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
import structlog
from starlette.requests import Request

from moorage.api.http import ProxyTrust, base_url, client_address
from moorage.auth.access import PULL, Principal
from moorage.auth.authenticator import Authenticator
from moorage.auth.scope import format_scope
from moorage.auth.tokens import TokenClaims
from moorage.config import Settings
from moorage.db.schema import utcnow
from moorage.errors import DeniedError, TooManyRequestsError, UnauthorizedError
from moorage.tls import client_certificate_login

log = structlog.get_logger(__name__)


class ChallengeError(UnauthorizedError):
    """A 401 that carries the WWW-Authenticate challenge to send."""

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": challenge}


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal
    token: TokenClaims | None

    def token_allows(self, type_: str, name: str, action: str) -> bool:
        """Tell whether the bearer token (if any) covers an action."""
        if self.token is None:
            return True
        actions = self.token.access.get((type_, name), frozenset())
        return action in actions or "*" in actions


@dataclass(frozen=True, slots=True)
class AuthAttempt:
    """What authentication saw, for the audit trail: the scheme, the claimed
    login, and why it failed (None on success). Never the password or token."""

    scheme: str
    login: str | None
    failure: str | None
    # The customer of the account, when the login names one; kept for failed
    # attempts too, but never sent in a response.
    customer: str | None = None


@dataclass(frozen=True, slots=True)
class Access:
    caller: Caller
    visible: bool


class RequestGuard:
    def __init__(
        self, authenticator: Authenticator, settings: Settings, trust: ProxyTrust
    ) -> None:
        self.authenticator = authenticator
        self.settings = settings
        self.trust = trust

    async def authenticate(self, request: Request, scope: str | None = None) -> Caller:
        """Return the caller; raise a challenge when credentials are missing or bad."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        login: str | None = None
        try:
            certificate_login = client_certificate_login(request.scope)
            if scheme.lower() == "bearer" and value:
                principal, claims = await self.authenticator.from_token(value.strip())
                caller = Caller(principal, claims)
            elif scheme.lower() == "basic" and value:
                login, password = decode_basic(value)
                address = client_address(request, self.trust)
                principal = await self.authenticator.login(login, password, address)
                caller = Caller(principal, None)
            elif certificate_login is not None:
                principal = await self.authenticator.from_certificate(certificate_login)
                caller = Caller(principal, None)
            else:
                raise UnauthorizedError("authentication required")
            check_client_certificate(self.settings, caller.principal, certificate_login)
        except UnauthorizedError as error:
            if value:
                request.state.auth = failed_attempt(
                    scheme, value, login or error.login, error
                )
            elif error.login is not None:
                request.state.auth = failed_login(CERTIFICATE, error.login, error)
            raise self.challenge(request, scope, error.message) from None
        except TooManyRequestsError as error:
            request.state.auth = AuthAttempt(
                scheme.lower(), login, error.message, error.customer
            )
            raise
        request.state.caller = caller
        request.state.auth = AuthAttempt(scheme.lower(), caller.principal.login, None)
        return caller

    async def authorize(
        self,
        request: Request,
        repository: str,
        actions: Iterable[str],
        *,
        mount_source: str | None = None,
    ) -> Access:
        """Check `actions` on `repository`; see the module docstring for outcomes.

        `mount_source` is the valid `from` repository of a cross-repository
        mount. Challenges then request pull on it as well, so a client that
        fetches the token the challenge names can mount. The mount itself
        checks the caller's rights on the source.
        """
        requested = sorted(set(actions))
        scope = format_scope("repository", repository, requested)
        if mount_source is not None and mount_source != repository:
            scope += " " + format_scope("repository", mount_source, [PULL])
        caller = await self.authenticate(request, scope)
        allowed = caller.principal.actions_on(repository, utcnow())
        if PULL not in allowed:
            request.state.denied = f"no pull permission on {repository}"
            return Access(caller, visible=False)
        missing_rights = [action for action in requested if action not in allowed]
        if missing_rights:
            request.state.denied = f"no {missing_rights[0]} permission on {repository}"
            raise DeniedError(
                f"requested access to the resource is denied: no {missing_rights[0]} "
                f"permission on {repository}"
            )
        if not all(caller.token_allows("repository", repository, a) for a in requested):
            raise self.challenge(
                request, scope, "token does not cover this action", insufficient=True
            )
        return Access(caller, visible=True)

    def challenge(
        self,
        request: Request,
        scope: str | None,
        message: str,
        *,
        insufficient: bool = False,
    ) -> ChallengeError:
        realm = f"{base_url(request, self.settings, self.trust)}/token"
        parts = [f'realm="{realm}"', f'service="{self.settings.service_name}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if insufficient:
            parts.append('error="insufficient_scope"')
        return ChallengeError(message, "Bearer " + ",".join(parts))


def check_client_certificate(
    settings: Settings, principal: Principal, certificate_login: str | None
) -> None:
    """Reject an account whose customer requires mutual TLS without its certificate."""
    required = settings.tls_client_cert_customers
    if principal.customer_slug in required and certificate_login != principal.login:
        log.info(
            "login failed",
            subject=principal.login,
            reason="client certificate required",
        )
        raise UnauthorizedError(
            f"a client certificate for {principal.login} is required",
            customer=principal.customer_slug,
        )


def failed_attempt(
    scheme: str, value: str, login: str | None, error: UnauthorizedError
) -> AuthAttempt:
    """Describe a failed authentication for the audit trail.

    For a bearer token whose signature was valid but whose account may no
    longer use it (revoked, disabled, expired), the unverified subject names the
    account; for a token that failed verification the subject is not trusted.
    """
    reason = error.reason
    if scheme.lower() == "bearer" and not reason.startswith("invalid token"):
        try:
            claims = jwt.decode(value.strip(), options={"verify_signature": False})
            login = str(claims.get("sub")) if claims.get("sub") else None
        except jwt.PyJWTError:
            login = None
    return AuthAttempt(scheme.lower(), login, reason, error.customer)


# The scheme of a failed login with a client certificate alone.
CERTIFICATE = "certificate"


def failed_login(
    scheme: str, login: str | None, error: UnauthorizedError
) -> AuthAttempt:
    """Describe a rejected login for the audit trail: the error's audit reason
    (more exact than its message) and the customer of the account, if known."""
    return AuthAttempt(scheme, login, error.reason, error.customer)


def decode_basic(value: str) -> tuple[str, str]:
    """Decode Basic credentials; raise UnauthorizedError when malformed."""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise UnauthorizedError("malformed Basic credentials") from None
    login, separator, password = decoded.partition(":")
    if not separator or not login:
        raise UnauthorizedError("malformed Basic credentials")
    return login, password
