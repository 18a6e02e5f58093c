"""A customer's users and robots: list, show, add, disable, enable, delete, and
reset a password or rotate a secret. Generated secrets appear once, in the
response that creates them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.requests import Request

from moorage import admin
from moorage.api.admin.auth import ChangeableCustomer, ReadableCustomer, services_of
from moorage.api.admin.models import (
    Account,
    CreatedRobot,
    CreatedUser,
    NewPassword,
    NewRobot,
    NewSecret,
    NewUser,
    RobotRotation,
    RoleChange,
)
from moorage.db.identity_store import AccountRecord
from moorage.errors import DeniedError

router = APIRouter(prefix="/customers/{customer}", tags=["accounts"])
NO_CONTENT = 204

# Removing, disabling or demoting the customer's last active owner gets 409
# LAST_OWNER, unless a vendor admin passes force=true.
Force = Annotated[
    bool,
    Query(
        description="Vendor admins only: make the change even when it leaves the "
        "customer without an active owner."
    ),
]


def _force_allowed(request: Request, access: ChangeableCustomer, force: bool) -> bool:
    """Return `force`, or raise DeniedError when a customer's owner passes it."""
    if force and access.owner:
        request.state.denied = f"force=true from an owner of customer {access.slug}"
        raise DeniedError(
            "force=true is for vendor admins: make another account owner first"
        )
    return force


async def _accounts(request: Request, slug: str, kind: str) -> list[Account]:
    identity = services_of(request).identity
    customer = await identity.get_customer(slug)
    records = await identity.list_accounts(customer.id)
    return [Account.of(record) for record in records if record.kind == kind]


async def _account(request: Request, slug: str, login: str, kind: str) -> AccountRecord:
    identity = services_of(request).identity
    await identity.get_customer(slug)
    return await admin.find_account_of(identity, slug, login, kind)


# Users


@router.get("/users", response_model=list[Account])
async def list_customer_users(
    request: Request, access: ReadableCustomer
) -> list[Account]:
    """List the customer's users."""
    return await _accounts(request, access.slug, "user")


@router.post("/users", status_code=201, response_model=CreatedUser)
async def add_customer_user(
    request: Request, access: ChangeableCustomer, body: NewUser
) -> CreatedUser:
    """Add a user with a generated password, returned only in this response."""
    identity = services_of(request).identity
    created = await admin.add_user(
        identity, access.slug, body.login, body.role, audit=access.audit
    )
    assert created.password is not None
    record = await _account(request, access.slug, created.login, "user")
    return CreatedUser(**Account.of(record).model_dump(), password=created.password)


@router.get("/users/{login}", response_model=Account)
async def show_customer_user(
    request: Request, access: ReadableCustomer, login: str
) -> Account:
    """Show one user of the customer."""
    return Account.of(await _account(request, access.slug, login, "user"))


@router.delete("/users/{login}", status_code=NO_CONTENT)
async def remove_customer_user(
    request: Request, access: ChangeableCustomer, login: str, force: Force = False
) -> Response:
    """Delete a user with its grants and personal access tokens."""
    identity = services_of(request).identity
    await identity.get_customer(access.slug)
    await admin.remove_user(
        identity,
        access.slug,
        login,
        force=_force_allowed(request, access, force),
        audit=access.audit,
    )
    return Response(status_code=NO_CONTENT)


@router.post("/users/{login}/disable", status_code=NO_CONTENT)
async def disable_customer_user(
    request: Request, access: ChangeableCustomer, login: str, force: Force = False
) -> Response:
    """Disable a user; its credentials and tokens fail from the next request."""
    await _set_enabled(request, access, login, "user", enabled=False, force=force)
    return Response(status_code=NO_CONTENT)


@router.post("/users/{login}/enable", status_code=NO_CONTENT)
async def enable_customer_user(
    request: Request, access: ChangeableCustomer, login: str
) -> Response:
    """Enable a user again; tokens issued before it was disabled stay rejected."""
    await _set_enabled(request, access, login, "user", enabled=True)
    return Response(status_code=NO_CONTENT)


@router.put("/users/{login}/role", response_model=Account)
async def set_customer_user_role(
    request: Request,
    access: ChangeableCustomer,
    login: str,
    body: RoleChange,
    force: Force = False,
) -> Account:
    """Change a user's role; it applies from the user's next request."""
    return await _set_role(request, access, login, "user", body.role, force)


@router.post("/users/{login}/password", response_model=NewPassword)
async def reset_customer_user_password(
    request: Request, access: ChangeableCustomer, login: str
) -> NewPassword:
    """Give a user a generated password; the old one and its tokens stop working."""
    identity = services_of(request).identity
    await identity.get_customer(access.slug)
    created = await admin.reset_password(
        identity, access.slug, login, audit=access.audit
    )
    assert created.password is not None
    return NewPassword(login=created.login, password=created.password)


async def _set_role(
    request: Request,
    access: ChangeableCustomer,
    login: str,
    kind: str,
    role: str,
    force: bool,
) -> Account:
    identity = services_of(request).identity
    await identity.get_customer(access.slug)
    await admin.set_role(
        identity,
        access.slug,
        login,
        kind,
        role,
        force=_force_allowed(request, access, force),
        audit=access.audit,
    )
    return Account.of(await _account(request, access.slug, login, kind))


async def _set_enabled(
    request: Request,
    access: ChangeableCustomer,
    login: str,
    kind: str,
    *,
    enabled: bool,
    force: bool = False,
) -> None:
    identity = services_of(request).identity
    await identity.get_customer(access.slug)
    await admin.set_enabled(
        identity,
        access.slug,
        login,
        kind,
        enabled,
        force=_force_allowed(request, access, force),
        audit=access.audit,
    )


# Robots


@router.get("/robots", response_model=list[Account])
async def list_customer_robots(
    request: Request, access: ReadableCustomer
) -> list[Account]:
    """List the customer's robots."""
    return await _accounts(request, access.slug, "robot")


@router.post("/robots", status_code=201, response_model=CreatedRobot)
async def add_customer_robot(
    request: Request, access: ChangeableCustomer, body: NewRobot
) -> CreatedRobot:
    """Add a robot `CUSTOMER+NAME` with a generated secret, returned only here."""
    identity = services_of(request).identity
    created = await admin.add_robot(
        identity, access.slug, body.name, body.role, body.expires_at, audit=access.audit
    )
    assert created.password is not None
    record = await _account(request, access.slug, created.login, "robot")
    return CreatedRobot(**Account.of(record).model_dump(), secret=created.password)


@router.get("/robots/{name}", response_model=Account)
async def show_customer_robot(
    request: Request, access: ReadableCustomer, name: str
) -> Account:
    """Show one robot of the customer, by its name without the customer prefix."""
    login = admin.robot_login(access.slug, name)
    return Account.of(await _account(request, access.slug, login, "robot"))


@router.delete("/robots/{name}", status_code=NO_CONTENT)
async def remove_customer_robot(
    request: Request, access: ChangeableCustomer, name: str, force: Force = False
) -> Response:
    """Delete a robot with its grants."""
    identity = services_of(request).identity
    await identity.get_customer(access.slug)
    await admin.remove_robot(
        identity,
        access.slug,
        name,
        force=_force_allowed(request, access, force),
        audit=access.audit,
    )
    return Response(status_code=NO_CONTENT)


@router.put("/robots/{name}/role", response_model=Account)
async def set_customer_robot_role(
    request: Request,
    access: ChangeableCustomer,
    name: str,
    body: RoleChange,
    force: Force = False,
) -> Account:
    """Change a robot's role; it applies from the robot's next request."""
    login = admin.robot_login(access.slug, name)
    return await _set_role(request, access, login, "robot", body.role, force)


@router.post("/robots/{name}/disable", status_code=NO_CONTENT)
async def disable_customer_robot(
    request: Request, access: ChangeableCustomer, name: str, force: Force = False
) -> Response:
    """Disable a robot; its secret and tokens fail from the next request."""
    login = admin.robot_login(access.slug, name)
    await _set_enabled(request, access, login, "robot", enabled=False, force=force)
    return Response(status_code=NO_CONTENT)


@router.post("/robots/{name}/enable", status_code=NO_CONTENT)
async def enable_customer_robot(
    request: Request, access: ChangeableCustomer, name: str
) -> Response:
    """Enable a robot again."""
    login = admin.robot_login(access.slug, name)
    await _set_enabled(request, access, login, "robot", enabled=True)
    return Response(status_code=NO_CONTENT)


@router.post("/robots/{name}/secret", response_model=NewSecret)
async def rotate_customer_robot_secret(
    request: Request,
    access: ChangeableCustomer,
    name: str,
    body: RobotRotation | None = None,
) -> NewSecret:
    """Give a robot a new secret; the old one and its tokens stop working now."""
    identity = services_of(request).identity
    await identity.get_customer(access.slug)
    expires_at = admin.check_future(body.expires_at if body else None, "expires_at")
    created = await admin.rotate_robot(
        identity, access.slug, name, expires_at, audit=access.audit
    )
    assert created.password is not None
    record = await _account(request, access.slug, created.login, "robot")
    return NewSecret(
        login=created.login, secret=created.password, expires_at=record.expires_at
    )
