"""The Docker token service: `GET /token` and the public keys at `/token/jwks`.

The response holds a JWT whose `access` claim is the intersection of the scopes
asked for and what the account may do. A partial or empty grant is no error;
only bad credentials get a 401.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moorage.api.access import AuthAttempt, Caller, decode_basic
from moorage.auth.access import Principal
from moorage.auth.scope import Scope, format_scope, parse_scopes
from moorage.db.schema import utcnow
from moorage.errors import NameInvalidError, UnauthorizedError
from moorage.names import validate_name
from moorage.services import Services


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
            actions = scope.actions & {"*"}
        else:
            actions = frozenset()
        if actions:
            granted.append(Scope(scope.type, scope.name, actions))
    return granted


def format_granted(scope: Scope) -> str:
    return format_scope(scope.type, scope.name, sorted(scope.actions))


def routes(services: Services) -> list[Route]:
    authenticator = services.authenticator
    tokens = services.tokens

    async def issue_token(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            raise BasicChallengeError("authentication required")
        login = None
        try:
            login, password = decode_basic(value)
            principal = await authenticator.login(login, password)
        except UnauthorizedError as error:
            request.state.auth = AuthAttempt("basic", login, error.message)
            raise BasicChallengeError(error.message) from None
        request.state.subject = principal.login
        request.state.caller = Caller(principal, None)
        request.state.auth = AuthAttempt("basic", principal.login, None)

        asked = parse_scopes(request.query_params.getlist("scope"))
        granted = granted_scopes(principal, asked)
        request.state.token_scopes = " ".join(map(format_granted, granted))[:500]
        issued = tokens.issue(principal.login, principal.token_generation, granted)
        return JSONResponse(
            {
                "token": issued.token,
                "access_token": issued.token,
                "expires_in": issued.expires_in,
                "issued_at": issued.issued_at,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def jwks(request: Request) -> Response:
        return JSONResponse(tokens.jwks())

    return [
        Route("/token", issue_token, methods=["GET"]),
        Route("/token/jwks", jwks, methods=["GET"]),
    ]
