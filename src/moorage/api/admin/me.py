"""The caller's own account: who am I, and my personal access tokens.

Creating a personal access token needs the password: a token must not mint
another token that outlives it. Listing and revoking work with a token too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Response
from starlette.requests import Request

from moorage import admin
from moorage.api.admin.auth import ApiCaller, CurrentCaller, services_of
from moorage.api.admin.models import (
    CreatedPersonalToken,
    Me,
    NewPersonalToken,
    PersonalToken,
)
from moorage.audit.recorder import AdminRecorder
from moorage.db.identity_store import AccountRecord
from moorage.errors import DeniedError

router = APIRouter(prefix="/me", tags=["me"])
DEFAULT_TOKEN_DAYS = 90


@router.get("", response_model=Me)
async def show_me(caller: CurrentCaller) -> Me:
    """Show the account this request authenticated as, and what it may manage."""
    principal = caller.principal
    role = caller.management_role
    return Me(
        login=principal.login,
        kind=principal.kind,
        customer=principal.customer_slug,
        role=principal.role,
        personal_token_id=principal.personal_token_id,
        token_role=principal.ceiling,
        management_role=role.value if role else None,
    )


async def _my_user(request: Request, caller: ApiCaller) -> AccountRecord:
    if caller.principal.kind != "user":
        raise DeniedError(
            "robots have no personal access tokens: rotate the robot's secret instead"
        )
    identity = services_of(request).identity
    return await admin.find_account_of(
        identity, caller.customer_slug, caller.principal.login, "user"
    )


@router.get("/tokens", response_model=list[PersonalToken])
async def list_my_tokens(
    request: Request, caller: CurrentCaller
) -> list[PersonalToken]:
    """List my personal access tokens, revoked and expired ones included."""
    account = await _my_user(request, caller)
    records = await services_of(request).identity.list_personal_tokens(account.id)
    return [PersonalToken.of(record) for record in records]


@router.post("/tokens", status_code=201, response_model=CreatedPersonalToken)
async def add_my_token(
    request: Request, caller: CurrentCaller, body: NewPersonalToken
) -> CreatedPersonalToken:
    """Create a personal access token, returned only in this response."""
    await _my_user(request, caller)
    if caller.personal_token:
        request.state.denied = "personal access token creation with a token"
        raise DeniedError("log in with your password to create a personal access token")
    expires_at = body.expires_at or datetime.now(UTC) + timedelta(
        days=DEFAULT_TOKEN_DAYS
    )
    identity = services_of(request).identity
    created = await admin.add_personal_token(
        identity,
        caller.customer_slug,
        caller.principal.login,
        body.name,
        body.role,
        expires_at,
        body.repositories,
        audit=AdminRecorder(services_of(request).audit, caller.actor),
    )
    record = await identity.get_personal_token(created.id)
    assert record is not None
    listed = PersonalToken.of(record).model_dump()
    return CreatedPersonalToken(**listed, token=created.token)


@router.delete("/tokens/{token_id}", status_code=204)
async def revoke_my_token(
    request: Request, caller: CurrentCaller, token_id: int
) -> Response:
    """Revoke one of my personal access tokens; it fails from the next request."""
    await _my_user(request, caller)
    await admin.revoke_personal_token(
        services_of(request).identity,
        caller.customer_slug,
        caller.principal.login,
        token_id,
        audit=AdminRecorder(services_of(request).audit, caller.actor),
    )
    return Response(status_code=204)
