"""The Docker token service: `GET /token`, the OAuth2 `POST /token` form, and the
public keys at `/token/jwks`.

The response holds a JWT whose `access` claim is the intersection of the scopes
asked for and what the account may do. A partial or empty grant is no error;
only bad credentials get a 401.

Both reject a `service` other than the registry's own with 400. In the CNCF
distribution token specification, `service` names the service that hosts the
resource, and the registry's `WWW-Authenticate` challenge sends its
`service_name`. A missing or empty `service` is accepted.

GET takes HTTP Basic credentials and `scope` parameters (several, each possibly
space-separated); `offline_token=true` adds a refresh token. POST takes the
OAuth2 form that docker and podman send: `grant_type=password` with `username`
and `password`, or `grant_type=refresh_token` with `refresh_token`; `scope` is
space-separated and `access_type=offline` adds a refresh token.

Both reject an account of a customer in `tls_client_cert_customers` unless the
request carries a client certificate for that account's login, whatever the
grant type.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import MultiDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moorage.api.access import (
    CERTIFICATE,
    AuthAttempt,
    Caller,
    check_client_certificate,
    decode_basic,
    failed_login,
)
from moorage.api.http import client_address, read_limited
from moorage.auth.access import Principal
from moorage.auth.scope import Scope, format_scope, parse_scopes
from moorage.db.schema import utcnow
from moorage.errors import (
    NameInvalidError,
    TooManyRequestsError,
    UnauthorizedError,
    UnsupportedError,
)
from moorage.names import validate_name
from moorage.services import Services
from moorage.tls import client_certificate_login

CATALOG_ACTIONS = frozenset({"*"})
MAX_FORM_BYTES = 64 * 1024
# The refresh_tokens.client_id column's width.
MAX_CLIENT_ID_LENGTH = 100


class BasicChallengeError(UnauthorizedError):
    """Bad or missing credentials at the token endpoint."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": 'Basic realm="moorage"'}


def granted_scopes(principal: Principal, asked: list[Scope]) -> list[Scope]:
    """Return what may be granted of each asked scope, dropping empty ones."""
    now = utcnow()
    granted: list[Scope] = []
    for scope in asked:
        if scope.type == "repository":
            try:
                validate_name(scope.name)
            except NameInvalidError:
                continue
            actions = scope.actions & principal.actions_on(scope.name, now)
        elif scope.type == "registry" and scope.name == "catalog":
            actions = scope.actions & CATALOG_ACTIONS
        else:
            actions = frozenset()
        if actions:
            granted.append(Scope(scope.type, scope.name, actions))
    return granted


def check_service(values: list[str], service_name: str) -> None:
    """Raise UnsupportedError unless each `service` value is empty or `service_name`."""
    for value in values:
        if value and value != service_name:
            truncated = value[:100]
            raise UnsupportedError(
                f"invalid service {truncated!r}: this registry issues tokens only "
                f"for service {service_name!r}, the one in its WWW-Authenticate "
                "challenge",
                detail={"service": truncated, "expected": service_name},
            )


def format_granted(scope: Scope) -> str:
    return format_scope(scope.type, scope.name, sorted(scope.actions))


async def read_form(request: Request) -> MultiDict:
    """Read an application/x-www-form-urlencoded body of at most MAX_FORM_BYTES."""
    body = await read_limited(request, MAX_FORM_BYTES)
    if body is None:
        raise UnsupportedError(f"the form is larger than {MAX_FORM_BYTES} bytes")
    try:
        return MultiDict(parse_qsl(body.decode(), keep_blank_values=True))
    except UnicodeDecodeError:
        raise UnsupportedError("the form is not UTF-8") from None


def routes(services: Services) -> list[Route]:
    authenticator = services.authenticator
    tokens = services.tokens
    trust = services.trust
    service_name = services.settings.service_name

    async def token_response(
        request: Request,
        principal: Principal,
        asked: list[Scope],
        offline: bool,
        client_id: str,
    ) -> Response:
        request.state.subject = principal.login
        request.state.caller = Caller(principal, None)
        granted = granted_scopes(principal, asked)
        request.state.token_scopes = " ".join(map(format_granted, granted))[:500]
        issued = tokens.issue(
            principal.login,
            principal.token_generation,
            granted,
            principal.personal_token_id,
            account_id=principal.account_id,
        )
        body: dict[str, Any] = {
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": issued.issued_at,
            "scope": " ".join(str(scope) for scope in granted),
        }
        if offline:
            refresh = await authenticator.issue_refresh(
                principal,
                client_id[:MAX_CLIENT_ID_LENGTH] or None,
                client_address(request, trust),
            )
            body["refresh_token"] = refresh.token
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def issue_token(request: Request) -> Response:
        check_service(request.query_params.getlist("service"), service_name)
        await tokens.reload()
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        certificate_login = None
        login = None
        try:
            certificate_login = client_certificate_login(request.scope)
            if scheme.lower() == "basic" and value:
                login, password = decode_basic(value)
                principal = await authenticator.login(
                    login, password, client_address(request, trust)
                )
            elif certificate_login is not None:
                principal = await authenticator.from_certificate(certificate_login)
            else:
                raise UnauthorizedError("authentication required")
            check_client_certificate(services.settings, principal, certificate_login)
        except UnauthorizedError as error:
            if value or certificate_login is not None:
                request.state.auth = failed_login("basic", login or error.login, error)
            elif error.login is not None:
                request.state.auth = failed_login(CERTIFICATE, error.login, error)
            raise BasicChallengeError(error.message) from None
        except TooManyRequestsError as error:
            request.state.auth = AuthAttempt(
                "basic", login, error.message, error.customer
            )
            raise
        request.state.auth = AuthAttempt("basic", principal.login, None)
        params = request.query_params
        asked = parse_scopes(params.getlist("scope"))
        offline = params.get("offline_token", "").lower() == "true"
        client_id = params.get("client_id", "")
        return await token_response(request, principal, asked, offline, client_id)

    async def oauth_token(request: Request) -> Response:
        await tokens.reload()
        form = await read_form(request)
        check_service(form.getlist("service"), service_name)
        grant_type = form.get("grant_type", "")
        # Both grants check the client certificate, as GET /token does: a
        # customer that requires mutual TLS gets no token without it, and a
        # revoked certificate gets none (inside `try`, so that it is audited).
        if grant_type == "password":
            login = form.get("username", "")
            try:
                principal = await authenticator.login(
                    login, form.get("password", ""), client_address(request, trust)
                )
                check_client_certificate(
                    services.settings,
                    principal,
                    client_certificate_login(request.scope),
                )
            except UnauthorizedError as error:
                request.state.auth = failed_login("password", login, error)
                raise
            except TooManyRequestsError as error:
                request.state.auth = AuthAttempt(
                    "password", login, error.message, error.customer
                )
                raise
            request.state.auth = AuthAttempt("password", principal.login, None)
        elif grant_type == "refresh_token":
            try:
                principal = await authenticator.from_refresh_token(
                    form.get("refresh_token", ""), client_address(request, trust)
                )
                # NOTE: the refresh token's use is recorded before this check,
                # so a rejected use still updates its "last used" time.
                check_client_certificate(
                    services.settings,
                    principal,
                    client_certificate_login(request.scope),
                )
            except UnauthorizedError as error:
                request.state.auth = failed_login("refresh", error.login, error)
                raise
        else:
            raise UnsupportedError(
                f"unsupported grant_type {grant_type[:40]!r}: use password or "
                "refresh_token"
            )
        asked = parse_scopes(form.getlist("scope"))
        offline = form.get("access_type") == "offline"
        client_id = form.get("client_id", "")
        return await token_response(request, principal, asked, offline, client_id)

    async def jwks(request: Request) -> Response:
        await tokens.reload()
        return JSONResponse(tokens.jwks())

    return [
        Route("/token", issue_token, methods=["GET"]),
        Route("/token", oauth_token, methods=["POST"]),
        Route("/token/jwks", jwks, methods=["GET"]),
    ]
