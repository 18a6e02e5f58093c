"""Who calls the admin API, and which customers the caller may read or change.

Every request carries HTTP Basic credentials: a login with its password, a
robot secret or a personal access token. They go through the registry's
`Authenticator`, with the same failed-login throttle. Each request loads the
account's current state, so a disabled account, a suspended customer, a
rotated secret or a revoked personal access token is rejected on the next
request. Registry bearer tokens from `/token` are rejected: they are scoped to
repositories and handed to registry clients, and must not work as an admin
credential.

Rights over a customer (`ManagementRole`):

- vendor `admin`: read and change every customer;
- vendor `auditor`: read every customer, change none (403);
- the customer's `owner`: read and change its own customer;
- any other account of the customer: 403 (it knows its customer exists);
- everybody else: 404 with the body a missing customer gets, before any lookup,
  so that the answer never reveals whether a customer exists.

A personal access token capped below `owner` manages nothing: a customer
owner's token acts as a plain member, a vendor admin's token as an auditor.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, Security
from fastapi.openapi.models import HTTPBase as HTTPBaseModel
from fastapi.security.base import SecurityBase
from starlette.requests import Request

from moorage.api.access import (
    AuthAttempt,
    Caller,
    check_client_certificate,
    failed_login,
)
from moorage.api.access import decode_basic as decode_basic_credentials
from moorage.api.http import base_url, client_address
from moorage.api.token import BasicChallengeError
from moorage.audit.recorder import Actor, AdminRecorder
from moorage.auth.access import Principal
from moorage.auth.secrets import PERSONAL_TOKEN_PREFIX
from moorage.errors import (
    DeniedError,
    NotFoundError,
    TooManyRequestsError,
    UnauthorizedError,
)
from moorage.services import Services
from moorage.tls import client_certificate_login


class ManagementRole(StrEnum):
    ADMIN = "admin"
    AUDITOR = "auditor"
    OWNER = "owner"


@dataclass(frozen=True, slots=True)
class ApiCaller:
    """An authenticated caller of the admin API, with the actor its changes name."""

    principal: Principal
    actor: Actor
    # True when the caller logged in with a personal access token, not a
    # password or robot secret.
    personal_token: bool

    @property
    def management_role(self) -> ManagementRole | None:
        principal = self.principal
        # A personal access token manages nothing. New tokens cannot be owner;
        # this also holds for owner tokens created before that rule.
        capped = (
            principal.ceiling is not None or principal.token_repositories is not None
        )
        if principal.is_vendor:
            if principal.role == "admin" and not capped:
                return ManagementRole.ADMIN
            return ManagementRole.AUDITOR if principal.role else None
        if principal.role == "owner" and not capped:
            return ManagementRole.OWNER
        return None

    @property
    def customer_slug(self) -> str:
        """The caller's customer, or `-` for the vendor's accounts."""
        return self.principal.customer_slug or "-"


@dataclass(frozen=True, slots=True)
class CustomerAccess:
    """A customer the caller may act on, and how its changes are recorded."""

    slug: str
    caller: ApiCaller
    audit: AdminRecorder
    # True for a customer's owner, whose grants must stay in its own namespaces.
    owner: bool


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


class BasicLogin(SecurityBase):
    """HTTP Basic through the registry's Authenticator; see the module docstring."""

    def __init__(self) -> None:
        self.model = HTTPBaseModel(
            scheme="basic",
            description=(
                "A login with its password, a robot login (customer+name) with "
                "its secret, or a login with a personal access token."
            ),
        )
        self.scheme_name = "basic"

    async def __call__(self, request: Request) -> ApiCaller:
        services = services_of(request)
        reject_cross_site_change(request, services)
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        login: str | None = None
        try:
            if scheme.lower() == "bearer":
                raise UnauthorizedError(
                    "the admin API takes HTTP Basic credentials (a password, robot "
                    "secret or personal access token), not registry bearer tokens"
                )
            if scheme.lower() != "basic" or not value.strip():
                raise UnauthorizedError("authentication required: use HTTP Basic")
            login, password = decode_basic_credentials(value)
            address = client_address(request, services.trust)
            principal = await services.authenticator.login(login, password, address)
            check_client_certificate(
                services.settings, principal, client_certificate_login(request.scope)
            )
        except UnauthorizedError as error:
            if value:
                request.state.auth = failed_login(scheme.lower(), login, error)
            raise BasicChallengeError(error.message) from None
        except TooManyRequestsError as error:
            request.state.auth = AuthAttempt(
                "basic", login, error.message, error.customer
            )
            raise
        request.state.caller = Caller(principal, None)
        request.state.auth = AuthAttempt("basic", principal.login, None)
        return ApiCaller(
            principal,
            _actor(request, services, principal),
            personal_token=password.startswith(PERSONAL_TOKEN_PREFIX),
        )


# Methods that change nothing in the admin API.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of requests that no other site's page started.
OWN_SITE_FETCHES = frozenset({"same-origin", "none"})


def reject_cross_site_change(request: Request, services: Services) -> None:
    """Raise DeniedError for a change that another site's page sent (CSRF).

    After a browser has shown its Basic login prompt for this server, it sends
    those credentials with every request to it, including a form POST from
    another site, which needs no CORS preflight. Browsers mark such requests
    with `Sec-Fetch-Site`, or with an `Origin` of the other site.
    Command-line clients send neither header, so they are not affected.
    """
    if request.method in SAFE_METHODS:
        return
    fetch_site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if fetch_site is not None:
        cross_site = fetch_site not in OWN_SITE_FETCHES
    elif origin is not None:
        own_origin = base_url(request, services.settings, services.trust)
        cross_site = origin.rstrip("/") != own_origin
    else:
        return
    if cross_site:
        request.state.denied = "cross-site request to the admin API"
        raise DeniedError(
            f"cross-site {request.method} rejected (Sec-Fetch-Site "
            f"{(fetch_site or '')[:40]!r}, Origin {(origin or '')[:100]!r}): the "
            "admin API takes changes only from this server's own pages or from "
            "clients that send neither header"
        )


def _actor(request: Request, services: Services, principal: Principal) -> Actor:
    return Actor(
        account=principal.login,
        customer=principal.customer_slug,
        source_address=client_address(request, services.trust),
        user_agent=request.headers.get("user-agent"),
        request_id=getattr(request.state, "request_id", None),
    )


basic_login = BasicLogin()
CurrentCaller = Annotated[ApiCaller, Security(basic_login)]


def customer_not_found(slug: str) -> NotFoundError:
    """Return the error of a missing customer; hidden customers get the same."""
    return NotFoundError(f"customer {slug!r} not found")


def _customer_access(
    request: Request, customer: str, caller: ApiCaller, change: bool
) -> CustomerAccess:
    role = caller.management_role
    own = caller.principal.customer_slug == customer
    if role is None or (role is ManagementRole.OWNER and not own):
        if not own:
            request.state.denied = f"no access to customer {customer}"
            raise customer_not_found(customer)
        request.state.denied = f"not an owner of customer {customer}"
        raise DeniedError(
            f"managing the accounts of {customer!r} needs the owner role; "
            "ask an owner of your customer or the vendor"
        )
    if change and role is ManagementRole.AUDITOR:
        request.state.denied = f"read-only access to customer {customer}"
        raise DeniedError(
            "the auditor role is read-only: ask a vendor admin to make this change"
        )
    recorder = AdminRecorder(services_of(request).audit, caller.actor)
    return CustomerAccess(customer, caller, recorder, role is ManagementRole.OWNER)


async def readable_customer(
    request: Request, customer: str, caller: CurrentCaller
) -> CustomerAccess:
    """Dependency: a customer whose accounts and grants the caller may read."""
    return _customer_access(request, customer, caller, change=False)


async def changeable_customer(
    request: Request, customer: str, caller: CurrentCaller
) -> CustomerAccess:
    """Dependency: a customer whose accounts and grants the caller may change."""
    return _customer_access(request, customer, caller, change=True)


ReadableCustomer = Annotated[CustomerAccess, Depends(readable_customer)]
ChangeableCustomer = Annotated[CustomerAccess, Depends(changeable_customer)]
