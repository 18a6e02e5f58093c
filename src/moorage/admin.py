"""Administrative operations shared by the command line and future admin API."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from moorage.audit.events import CUSTOMER_ADD, USER_ADD, VENDOR_USER_ADD
from moorage.audit.recorder import AdminRecorder
from moorage.auth.access import CUSTOMER_ROLES, VENDOR_ROLES
from moorage.auth.secrets import generate_secret, hash_password
from moorage.db.identity_store import CustomerRecord, IdentityStore
from moorage.errors import MoorageError

# A customer slug is also its namespace, so it follows the repository name
# component grammar, without the double underscore.
_SLUG_PATTERN = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_LOGIN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
MIN_PASSWORD_LENGTH = 12


class InvalidInputError(MoorageError):
    """invalid input"""


@dataclass(frozen=True, slots=True)
class CreatedAccount:
    login: str
    password: str | None


def validate_slug(slug: str) -> str:
    if len(slug) > 64 or not _SLUG_PATTERN.fullmatch(slug):
        raise InvalidInputError(
            f"invalid customer name {slug!r}: use up to 64 lowercase letters, digits "
            "and single '.', '_' or '-' between them"
        )
    return slug


def validate_login(login: str) -> str:
    if not _LOGIN_PATTERN.fullmatch(login):
        raise InvalidInputError(
            f"invalid user name {login!r}: use up to 128 letters, digits, '.', '_', "
            "'@' and '-', starting with a letter or digit"
        )
    return login


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInputError(
            f"password is too short: use at least {MIN_PASSWORD_LENGTH} characters"
        )
    return password


async def add_customer(
    identity: IdentityStore,
    slug: str,
    display_name: str,
    access_until: datetime | None,
    *,
    audit: AdminRecorder | None = None,
) -> CustomerRecord:
    change = _create_customer(identity, slug, display_name, access_until)
    if audit is None:
        return await change
    until = access_until.date().isoformat() if access_until else "none"
    target = f"customer {slug} ({display_name}), access until {until}"
    return await audit.run(CUSTOMER_ADD, target, change, slug)


async def _create_customer(
    identity: IdentityStore, slug: str, display_name: str, access_until: datetime | None
) -> CustomerRecord:
    return await identity.create_customer(
        validate_slug(slug), display_name, access_until
    )


async def add_user(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    role: str,
    password: str | None = None,
    *,
    audit: AdminRecorder | None = None,
) -> CreatedAccount:
    """Create a customer's user; generate a password unless one is given."""
    change = _create_user(identity, customer_slug, login, role, password)
    if audit is None:
        return await change
    target = f"user {login} of {customer_slug} as {role}"
    return await audit.run(USER_ADD, target, change, customer_slug)


async def _create_user(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    role: str,
    password: str | None,
) -> CreatedAccount:
    if role not in CUSTOMER_ROLES:
        raise InvalidInputError(
            f"invalid role {role!r}: use one of {', '.join(CUSTOMER_ROLES)}"
        )
    customer = await identity.get_customer(customer_slug)
    generated = password is None
    secret = generate_secret() if password is None else check_password(password)
    await identity.create_account(
        login=validate_login(login),
        customer_id=customer.id,
        kind="user",
        role=role,
        secret_hash=hash_password(secret),
    )
    return CreatedAccount(login, secret if generated else None)


async def add_vendor_user(
    identity: IdentityStore,
    login: str,
    role: str,
    password: str | None = None,
    *,
    audit: AdminRecorder | None = None,
) -> CreatedAccount:
    change = _create_vendor_user(identity, login, role, password)
    if audit is None:
        return await change
    target = f"vendor user {login} as {role}"
    return await audit.run(VENDOR_USER_ADD, target, change, None)


async def _create_vendor_user(
    identity: IdentityStore, login: str, role: str, password: str | None
) -> CreatedAccount:
    if role not in VENDOR_ROLES:
        raise InvalidInputError(
            f"invalid vendor role {role!r}: use one of {', '.join(VENDOR_ROLES)}"
        )
    generated = password is None
    secret = generate_secret() if password is None else check_password(password)
    await identity.create_account(
        login=validate_login(login),
        customer_id=None,
        kind="user",
        role=role,
        secret_hash=hash_password(secret),
    )
    return CreatedAccount(login, secret if generated else None)


async def ensure_vendor_admin(
    identity: IdentityStore,
    login: str,
    password: str | None,
    *,
    audit: AdminRecorder | None = None,
) -> CreatedAccount | None:
    """Create the first vendor admin on a new installation; None if one exists."""
    if await identity.has_vendor_admin():
        return None
    return await add_vendor_user(identity, login, "admin", password, audit=audit)
