"""`PUT /account/password`: a user sets a new password under the policy.

The request carries the current password as HTTP Basic credentials (a personal
access token or a bearer token is not enough) and the new one as JSON:
`{"password": "..."}`. Every token issued before stops working.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage import admin
from moorage.api.access import (
    AuthAttempt,
    Caller,
    check_client_certificate,
    decode_basic,
    failed_login,
)
from moorage.api.http import client_address, read_limited
from moorage.api.token import BasicChallengeError
from moorage.auth.secrets import PERSONAL_TOKEN_PREFIX
from moorage.errors import UnauthorizedError
from moorage.services import Services
from moorage.tls import client_certificate_login

MAX_BODY_BYTES = 4096


def routes(services: Services) -> list[Route]:
    authenticator = services.authenticator
    identity = services.identity

    async def set_password(request: Request) -> Response:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not value:
            raise BasicChallengeError("authentication required")
        login = None
        try:
            login, password = decode_basic(value)
            if password.startswith(PERSONAL_TOKEN_PREFIX):
                raise UnauthorizedError("log in with the current password")
            principal = await authenticator.login(
                login, password, client_address(request, services.trust)
            )
            check_client_certificate(
                services.settings, principal, client_certificate_login(request.scope)
            )
        except UnauthorizedError as error:
            request.state.auth = failed_login("basic", login, error)
            raise BasicChallengeError(error.message) from None
        request.state.subject = principal.login
        request.state.caller = Caller(principal, None)
        request.state.auth = AuthAttempt("basic", principal.login, None)
        new_password = _new_password(await read_limited(request, MAX_BODY_BYTES))
        account = await identity.get_account(principal.account_id)
        assert account is not None
        await admin.change_password(identity, account, new_password)
        return Response(status_code=204)

    return [Route("/account/password", set_password, methods=["PUT"])]


def _new_password(body: bytes | None) -> str:
    try:
        document = json.loads(body or b"")
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("password"), str):
        raise admin.InvalidInputError(
            'send the new password as JSON: {"password": "..."}'
        )
    return str(document["password"])
