"""A customer's grants: list them all, add and remove them.

A customer's owner adds and removes grants inside the customer's own
namespaces only (`admin.check_within_namespaces`), to the whole customer or to
one of its accounts, with a customer role (at most `owner`). Grants on other
namespaces, such as the vendor's products, are made and removed by a vendor
admin."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.requests import Request

from moorage import admin
from moorage.api.admin.auth import ChangeableCustomer, ReadableCustomer, services_of
from moorage.api.admin.models import Grant, NewGrant

router = APIRouter(prefix="/customers/{customer}", tags=["grants"])


@router.get("/grants", response_model=list[Grant])
async def list_customer_grants(
    request: Request, access: ReadableCustomer
) -> list[Grant]:
    """List every grant of the customer, including those the vendor made."""
    identity = services_of(request).identity
    customer = await identity.get_customer(access.slug)
    logins = {
        account.id: account.login
        for account in await identity.list_accounts(customer.id)
    }
    records = await identity.list_grants(customer.id)
    return [Grant.of(record, logins) for record in records]


@router.post("/grants", status_code=201, response_model=Grant)
async def add_customer_grant(
    request: Request, access: ChangeableCustomer, body: NewGrant
) -> Grant:
    """Grant a role on a pattern to the customer or one of its accounts."""
    identity = services_of(request).identity
    grant_id = await admin.add_grant(
        identity,
        access.slug,
        body.pattern,
        body.role,
        body.until,
        body.account,
        own_namespaces_only=access.owner,
        audit=access.audit,
    )
    return Grant(
        id=grant_id,
        pattern=body.pattern,
        role=body.role,
        until=body.until,
        account=body.account,
    )


@router.delete("/grants/{grant_id}", status_code=204)
async def remove_customer_grant(
    request: Request, access: ChangeableCustomer, grant_id: int
) -> Response:
    """Remove a grant; access through it ends on the next request."""
    await admin.remove_grant(
        services_of(request).identity,
        access.slug,
        grant_id,
        own_namespaces_only=access.owner,
        audit=access.audit,
    )
    return Response(status_code=204)
