"""The customers a caller may see: all for the vendor, its own for an owner."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request

from moorage.api.admin.auth import (
    CurrentCaller,
    ManagementRole,
    ReadableCustomer,
    services_of,
)
from moorage.api.admin.models import Customer
from moorage.db.identity_store import CustomerRecord

router = APIRouter(prefix="/customers", tags=["customers"])


async def _customer(request: Request, record: CustomerRecord) -> Customer:
    namespaces = await services_of(request).identity.namespaces_of(record.id)
    return Customer.of(record, namespaces)


@router.get("", response_model=list[Customer])
async def list_customers(request: Request, caller: CurrentCaller) -> list[Customer]:
    """List the customers the caller may read: every customer for vendor admins
    and auditors, its own for an owner, and none for anybody else."""
    identity = services_of(request).identity
    role = caller.management_role
    if role in (ManagementRole.ADMIN, ManagementRole.AUDITOR):
        records = await identity.list_customers()
    elif role is ManagementRole.OWNER:
        records = [await identity.get_customer(caller.customer_slug)]
    else:
        records = []
    return [await _customer(request, record) for record in records]


@router.get("/{customer}", response_model=Customer)
async def show_customer(request: Request, access: ReadableCustomer) -> Customer:
    """Show a customer: its name, state, contract end and namespaces."""
    record = await services_of(request).identity.get_customer(access.slug)
    return await _customer(request, record)
