"""Administrative operations shared by the command line and the admin API.

Each change takes an optional `audit` recorder; with one, the change and its
outcome become one audit event whose description never contains a secret.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from moorage.audit.events import (
    CUSTOMER_ADD,
    GRANT_ADD,
    GRANT_REMOVE,
    PERSONAL_TOKEN_ADD,
    PERSONAL_TOKEN_REVOKE,
    ROBOT_ADD,
    ROBOT_DISABLE,
    ROBOT_ENABLE,
    ROBOT_REMOVE,
    ROBOT_ROLE,
    ROBOT_ROTATE,
    USER_ADD,
    USER_DISABLE,
    USER_ENABLE,
    USER_PASSWORD_RESET,
    USER_REMOVE,
    USER_ROLE,
    VENDOR_USER_ADD,
)
from moorage.audit.recorder import AdminRecorder
from moorage.auth.access import (
    CUSTOMER_ROLES,
    VENDOR_ROLES,
    pattern_reaches_namespace,
)
from moorage.auth.secrets import (
    PERSONAL_TOKEN_PREFIX,
    SECRET_HASH_KEY,
    generate_secret,
    hash_password,
    keyed_hash,
)
from moorage.db.identity_store import (
    AccountRecord,
    CustomerGrant,
    CustomerRecord,
    IdentityStore,
)
from moorage.db.login_failure_store import LoginFailureStore
from moorage.db.refresh_token_store import RefreshTokenRecord, RefreshTokenStore
from moorage.db.registry_store import RegistryStore
from moorage.db.schema import MAX_INTEGER_ID
from moorage.db.wrap_store import customer_owner
from moorage.errors import ConflictError, DeniedError, InvalidInputError, NotFoundError
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.maintenance import ShredReport, shred_owner

# A customer slug is also its namespace, so it follows the repository name
# component grammar, without the double underscore.
# The width of the customers.display_name column.
MAX_DISPLAY_NAME_LENGTH = 200
_SLUG_PATTERN = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_LOGIN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
# The password policy (NIST SP 800-63B style: length over composition rules).
MIN_PASSWORD_LENGTH = 12
# A grant pattern: repository name components, where `*` may stand anywhere.
_PATTERN_COMPONENT = r"[a-z0-9*]+(?:(?:\.|_|__|-+)[a-z0-9*]+)*"
_PATTERN = re.compile(rf"{_PATTERN_COMPONENT}(?:/{_PATTERN_COMPONENT})*")
MAX_PASSWORD_LENGTH = 256
MIN_DISTINCT_CHARACTERS = 5
# The largest id a grant or personal access token can have (see MAX_INTEGER_ID).
MAX_ROW_ID = MAX_INTEGER_ID


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


def validate_display_name(name: str) -> str:
    """Return a customer's display name when it fits; raise InvalidInputError."""
    if len(name) > MAX_DISPLAY_NAME_LENGTH:
        raise InvalidInputError(
            f"customer display name is too long ({len(name)} characters): use at "
            f"most {MAX_DISPLAY_NAME_LENGTH}"
        )
    for character in name:
        if unicodedata.category(character) == "Cc":
            raise InvalidInputError(
                f"invalid customer display name {name!r}: it contains the control "
                f"character U+{ord(character):04X}; use printable characters only"
            )
    return name


def validate_login(login: str) -> str:
    if not _LOGIN_PATTERN.fullmatch(login):
        raise InvalidInputError(
            f"invalid user name {login!r}: use up to 128 letters, digits, '.', '_', "
            "'@' and '-', starting with a letter or digit"
        )
    return login


def check_password(password: str, login: str | None = None) -> str:
    """Return `password` when it meets the policy; raise InvalidInputError.

    Policy: 12 to 256 characters, at least 5 different characters, and not the
    login name.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInputError(
            f"password is too short: use at least {MIN_PASSWORD_LENGTH} characters"
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidInputError(
            f"password is too long: use at most {MAX_PASSWORD_LENGTH} characters"
        )
    if len(set(password)) < MIN_DISTINCT_CHARACTERS:
        raise InvalidInputError(
            f"password is too repetitive: use at least {MIN_DISTINCT_CHARACTERS} "
            "different characters"
        )
    if login and login.lower() == password.lower():
        raise InvalidInputError("password must not be the login name")
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
        validate_slug(slug), validate_display_name(display_name), access_until
    )


async def grants_reaching_namespace(
    identity: IdentityStore, namespace: str, owner_slug: str
) -> list[CustomerGrant]:
    """Return the unexpired grants of customers other than `owner_slug` that
    match repositories in `namespace`.

    A grant on `umbrella/*` made while `umbrella` was still a vendor namespace
    gives its customer access to the images of a customer `umbrella` added
    later, so adding that customer should name such grants."""
    now = datetime.now(UTC)
    return [
        customer_grant
        for customer_grant in await identity.list_customer_grants()
        if customer_grant.customer_slug != owner_slug
        and (customer_grant.grant.until is None or customer_grant.grant.until > now)
        and pattern_reaches_namespace(customer_grant.grant.pattern, namespace)
    ]


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
    check_each(
        lambda: check_role(role),
        lambda: validate_login(login),
        lambda: password is None or check_password(password, login),
    )
    customer = await identity.get_customer(customer_slug)
    generated = password is None
    secret = generate_secret() if password is None else password
    # argon2id takes tens of milliseconds: keep it off the server's event loop.
    secret_hash = await asyncio.to_thread(hash_password, secret)
    await identity.create_account(
        login=login,
        customer_id=customer.id,
        kind="user",
        role=role,
        secret_hash=secret_hash,
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
    check_each(
        lambda: check_vendor_role(role),
        lambda: validate_login(login),
        lambda: password is None or check_password(password, login),
    )
    generated = password is None
    secret = generate_secret() if password is None else password
    await identity.create_account(
        login=login,
        customer_id=None,
        kind="user",
        role=role,
        secret_hash=hash_password(secret),
    )
    return CreatedAccount(login, secret if generated else None)


def check_vendor_role(role: str) -> str:
    """Return `role` when it is a vendor role; raise InvalidInputError if not."""
    if role not in VENDOR_ROLES:
        raise InvalidInputError(
            f"invalid vendor role {role!r}: use one of {', '.join(VENDOR_ROLES)}"
        )
    return role


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


def check_each(*checks: Callable[[], object]) -> None:
    """Run every check and raise one InvalidInputError with the problems of all
    of them, so that a caller learns of every invalid value at once."""
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except InvalidInputError as error:
            problems.extend(error.problems)
    if problems:
        raise InvalidInputError(problems=problems)


def check_role(role: str) -> str:
    """Return `role` when it is a customer role; raise InvalidInputError if not."""
    if role not in CUSTOMER_ROLES:
        raise InvalidInputError(
            f"invalid role {role!r}: use one of {', '.join(CUSTOMER_ROLES)}"
        )
    return role


# Roles a personal access token may have. A token never gets `owner`: it
# would manage the customer's accounts and grants, so a leaked token could
# create an owner account with a permanent password.
TOKEN_ROLES = ("reader", "writer", "maintainer")


def _check_token_role(role: str) -> str:
    if role not in TOKEN_ROLES:
        raise InvalidInputError(
            f"invalid token role {role!r}: use reader, writer or maintainer; "
            "to manage accounts and grants, log in with the password"
        )
    return role


def robot_login(customer_slug: str, name: str) -> str:
    """Return a robot's login name, `customer+name`, which shows whose it is."""
    if not _SLUG_PATTERN.fullmatch(name) or len(name) > 63:
        raise InvalidInputError(
            f"invalid robot name {name!r}: use up to 63 lowercase letters, digits "
            "and single '.', '_' or '-' between them"
        )
    return f"{customer_slug}+{name}"


async def find_account_of(
    identity: IdentityStore, customer_slug: str, login: str, kind: str | None
) -> AccountRecord:
    """Return the account `login` of a customer ("-" for the vendor) of one kind
    (None: a user or a robot)."""
    account = await identity.find_account(login)
    owner = None if account is None else (account.customer_slug or "-")
    if (
        account is None
        or owner != customer_slug
        or (kind is not None and account.kind != kind)
    ):
        raise NotFoundError(
            f"{kind or 'account'} {login!r} of {customer_slug!r} not found"
        )
    return account


# Robots


# NOTE: the command line (cli/identity.py) still builds these audit descriptions
# itself; they match the ones below until it passes `audit=` as the API does.
def describe_time(value: datetime | None) -> str:
    """Format an expiry or end date for audit descriptions and command output."""
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def check_future(value: datetime | None, field: str) -> datetime | None:
    """Return `value` when it is None or later than now; raise InvalidInputError."""
    if value is not None and value <= datetime.now(UTC):
        raise InvalidInputError(
            f"{field} {value.isoformat()} is in the past: use a later time"
        )
    return value


async def add_robot(
    identity: IdentityStore,
    customer_slug: str,
    name: str,
    role: str,
    expires_at: datetime | None = None,
    *,
    audit: AdminRecorder | None = None,
) -> CreatedAccount:
    """Create a robot account; return its login and generated secret."""
    change = _create_robot(identity, customer_slug, name, role, expires_at)
    if audit is None:
        return await change
    target = (
        f"robot {name} of {customer_slug} as {role}, "
        f"expires {describe_time(expires_at)}"
    )
    return await audit.run(ROBOT_ADD, target, change, customer_slug)


async def _create_robot(
    identity: IdentityStore,
    customer_slug: str,
    name: str,
    role: str,
    expires_at: datetime | None,
) -> CreatedAccount:
    check_each(
        lambda: robot_login(customer_slug, name),
        lambda: check_role(role),
        lambda: check_future(expires_at, "expires_at"),
    )
    customer = await identity.get_customer(customer_slug)
    login = robot_login(customer.slug, name)
    secret = generate_secret()
    key = await identity.server_key(SECRET_HASH_KEY)
    await identity.create_account(
        login=login,
        customer_id=customer.id,
        kind="robot",
        role=check_role(role),
        secret_hash=keyed_hash(key, secret),
        expires_at=expires_at,
    )
    return CreatedAccount(login, secret)


async def rotate_robot(
    identity: IdentityStore,
    customer_slug: str,
    name: str,
    expires_at: datetime | None = None,
    *,
    audit: AdminRecorder | None = None,
) -> CreatedAccount:
    """Give a robot a new secret; its old secret and tokens stop working now.

    The expiry stays as it was unless `expires_at` is given."""
    change = _rotate_robot(identity, customer_slug, name, expires_at)
    if audit is None:
        return await change
    target = f"robot {name} of {customer_slug}, expires {describe_time(expires_at)}"
    return await audit.run(ROBOT_ROTATE, target, change, customer_slug)


async def _rotate_robot(
    identity: IdentityStore,
    customer_slug: str,
    name: str,
    expires_at: datetime | None,
) -> CreatedAccount:
    login = robot_login(customer_slug, name)
    account = await find_account_of(identity, customer_slug, login, "robot")
    secret = generate_secret()
    key = await identity.server_key(SECRET_HASH_KEY)
    await identity.rotate_secret(account.id, keyed_hash(key, secret))
    if expires_at is not None:
        await identity.set_expiry(account.id, expires_at)
    return CreatedAccount(login, secret)


# Removing, disabling or demoting the last active owner of a customer (or the
# last active vendor admin) raises LastOwnerError, unless the caller passes
# `force`: the API allows it to vendor admins only, the command line to its
# operator.


def forced(target: str, force: bool) -> str:
    """Mark an audit description when `force` overrode the last-owner check."""
    return f"{target} (forced)" if force else target


async def remove_robot(
    identity: IdentityStore,
    customer_slug: str,
    name: str,
    *,
    force: bool = False,
    audit: AdminRecorder | None = None,
) -> None:
    """Delete a robot account with its grants."""
    change = _remove_account(
        identity, customer_slug, robot_login(customer_slug, name), "robot", force
    )
    if audit is None:
        return await change
    target = forced(f"robot {name} of {customer_slug}", force)
    return await audit.run(ROBOT_REMOVE, target, change, customer_slug)


async def remove_user(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    *,
    force: bool = False,
    audit: AdminRecorder | None = None,
) -> None:
    """Delete a user with its grants and personal access tokens."""
    change = _remove_account(identity, customer_slug, login, "user", force)
    if audit is None:
        return await change
    target = forced(f"user {login} of {customer_slug}", force)
    return await audit.run(USER_REMOVE, target, change, customer_slug)


async def _remove_account(
    identity: IdentityStore, customer_slug: str, login: str, kind: str, force: bool
) -> None:
    account = await find_account_of(identity, customer_slug, login, kind)
    await identity.delete_account(account.id, keep_an_owner=not force)


_ENABLE_ACTIONS = {
    ("user", True): USER_ENABLE,
    ("user", False): USER_DISABLE,
    ("robot", True): ROBOT_ENABLE,
    ("robot", False): ROBOT_DISABLE,
}


async def set_enabled(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    kind: str,
    enabled: bool,
    *,
    force: bool = False,
    audit: AdminRecorder | None = None,
) -> bool:
    """Enable or disable a user or robot; disabling rejects its tokens now.

    Returns False when the account was enabled or disabled already.
    """
    change = _set_enabled(identity, customer_slug, login, kind, enabled, force)
    if audit is None:
        return await change
    target = f"robot {login}" if kind == "robot" else f"user {login} of {customer_slug}"
    action = _ENABLE_ACTIONS[(kind, enabled)]
    return await audit.run(action, forced(target, force), change, customer_slug)


async def _set_enabled(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    kind: str,
    enabled: bool,
    force: bool,
) -> bool:
    account = await find_account_of(identity, customer_slug, login, kind)
    await identity.set_disabled(account.id, not enabled, keep_an_owner=not force)
    return account.disabled == enabled


_ROLE_ACTIONS = {"user": USER_ROLE, "robot": ROBOT_ROLE}


async def set_role(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    kind: str,
    role: str,
    *,
    force: bool = False,
    audit: AdminRecorder | None = None,
) -> None:
    """Change a customer's user or robot to another customer role.

    The new role applies from the next request: tokens carry scopes, and
    every request checks them against the account's current rights.
    """
    change = _set_role(identity, customer_slug, login, kind, role, force)
    if audit is None:
        return await change
    target = forced(f"{kind} {login} of {customer_slug} to {role}", force)
    return await audit.run(_ROLE_ACTIONS[kind], target, change, customer_slug)


async def _set_role(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    kind: str,
    role: str,
    force: bool,
) -> None:
    check_role(role)
    account = await find_account_of(identity, customer_slug, login, kind)
    if account.customer_id is None:
        raise InvalidInputError("vendor accounts keep their role; add a new account")
    await identity.set_role(account.id, role, keep_an_owner=not force)


async def change_password(
    identity: IdentityStore, account: AccountRecord, new_password: str
) -> None:
    """Set a user's password under the policy; tokens issued before stop working."""
    if account.kind != "user":
        raise InvalidInputError("only users have passwords; rotate a robot's secret")
    check_password(new_password, account.login)
    # argon2id takes tens of milliseconds: keep it off the server's event loop.
    password_hash = await asyncio.to_thread(hash_password, new_password)
    await identity.set_secret(account.id, password_hash)


async def reset_password(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    *,
    audit: AdminRecorder | None = None,
) -> CreatedAccount:
    """Give a user a generated password; its old password and tokens stop working.

    Its personal access tokens are revoked too: a reset is how an owner or the
    vendor takes a compromised or departed user's access back, and neither can
    see that user's tokens through the admin API.
    """
    change = _reset_password(identity, customer_slug, login)
    if audit is None:
        return await change
    target = f"user {login} of {customer_slug}"
    return await audit.run(USER_PASSWORD_RESET, target, change, customer_slug)


async def _reset_password(
    identity: IdentityStore, customer_slug: str, login: str
) -> CreatedAccount:
    account = await find_account_of(identity, customer_slug, login, "user")
    password = generate_secret()
    password_hash = await asyncio.to_thread(hash_password, password)
    await identity.set_secret(account.id, password_hash, revoke_personal_tokens=True)
    return CreatedAccount(login, password)


# Personal access tokens


@dataclass(frozen=True, slots=True)
class CreatedToken:
    id: int
    token: str


async def add_personal_token(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    name: str,
    role: str,
    expires_at: datetime | None,
    repositories: Sequence[str] | None = None,
    *,
    audit: AdminRecorder | None = None,
) -> CreatedToken:
    """Create a personal access token for a user, capped at `role` and, when
    `repositories` (grant patterns) is given, limited to matching repositories."""
    change = _create_personal_token(
        identity, customer_slug, login, name, role, expires_at, repositories
    )
    if audit is None:
        return await change
    where = "all repositories" if repositories is None else " ".join(repositories)
    target = (
        f"token {name!r} of {login} ({customer_slug}), at most {role} on {where}, "
        f"until {describe_time(expires_at)}"
    )
    return await audit.run(PERSONAL_TOKEN_ADD, target, change, customer_slug)


async def _create_personal_token(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    name: str,
    role: str,
    expires_at: datetime | None,
    repositories: Sequence[str] | None,
) -> CreatedToken:
    check_each(
        lambda: _check_token_role(role),
        lambda: check_future(expires_at, "expires_at"),
        *(partial(validate_pattern, pattern) for pattern in repositories or ()),
    )
    patterns = None
    if repositories is not None:
        if not repositories:
            raise InvalidInputError("give at least one repository pattern")
        patterns = list(dict.fromkeys(repositories))
    account = await find_account_of(identity, customer_slug, login, "user")
    secret = generate_secret()
    key = await identity.server_key(SECRET_HASH_KEY)
    token_id = await identity.add_personal_token(
        account.id,
        name,
        keyed_hash(key, secret),
        check_role(role),
        expires_at,
        patterns,
    )
    return CreatedToken(token_id, f"{PERSONAL_TOKEN_PREFIX}{token_id}_{secret}")


async def revoke_personal_token(
    identity: IdentityStore,
    customer_slug: str,
    login: str,
    token_id: int,
    *,
    audit: AdminRecorder | None = None,
) -> bool:
    """Revoke a user's personal access token; return False if it was revoked before."""
    change = _revoke_personal_token(identity, customer_slug, login, token_id)
    if audit is None:
        return await change
    target = f"token {token_id} of {login} ({customer_slug})"
    return await audit.run(PERSONAL_TOKEN_REVOKE, target, change, customer_slug)


async def _revoke_personal_token(
    identity: IdentityStore, customer_slug: str, login: str, token_id: int
) -> bool:
    account = await find_account_of(identity, customer_slug, login, "user")
    token = None
    if 1 <= token_id <= MAX_ROW_ID:
        token = await identity.get_personal_token(token_id)
    if token is None or token.account_id != account.id:
        raise NotFoundError(f"token {token_id} of {login!r} not found")
    await identity.revoke_personal_token(token_id)
    return token.revoked_at is None


# Refresh tokens


async def list_refresh_tokens(
    identity: IdentityStore,
    refresh_tokens: RefreshTokenStore,
    customer_slug: str,
    login: str,
) -> tuple[AccountRecord, list[RefreshTokenRecord]]:
    """Return a user's or robot's account with its recorded refresh tokens."""
    account = await find_account_of(identity, customer_slug, login, None)
    return account, await refresh_tokens.list_for(account.id)


async def revoke_refresh_tokens(
    identity: IdentityStore,
    refresh_tokens: RefreshTokenStore,
    customer_slug: str,
    login: str,
    jti: str | None,
) -> int:
    """Revoke one refresh token of an account by its id, or all with `jti` None.

    Return how many were revoked; an unknown or already revoked id is an error.
    """
    account = await find_account_of(identity, customer_slug, login, None)
    revoked = await refresh_tokens.revoke(account.id, jti)
    if jti is not None and revoked == 0:
        raise NotFoundError(
            f"no active refresh token {jti!r} of {login!r}; see moorage token "
            f"refresh list {customer_slug} {login}"
        )
    return revoked


# Failed logins


async def unlock_login(
    store: LoginFailureStore, login: str | None, address: str | None
) -> int:
    """Clear the failed-login counters of a login name, an address, or the pair
    of both; return how many were cleared."""
    if login is None and address is None:
        raise InvalidInputError("give a login name, an address or both")
    return await store.clear(login, address)


# Grants and customers


def validate_pattern(pattern: str) -> str:
    """Return a grant pattern when valid: a namespace, a name, or a glob of them."""
    if not _PATTERN.fullmatch(pattern):
        raise InvalidInputError(
            f"invalid pattern {pattern!r}: use a namespace (products), a repository "
            "(products/app) or a glob (products/*)"
        )
    return pattern


def check_within_namespaces(pattern: str, own_namespaces: list[str]) -> str:
    """Return `pattern` when it can match only repositories in `own_namespaces`.

    The first component must be one of the namespaces, spelled out without `*`:
    `acme`, `acme/*` and `acme/app-*` pass, `acme*` and `*/app` do not."""
    namespace = pattern.split("/", 1)[0]
    if namespace not in own_namespaces:
        choices = ", ".join(f"{name}/*" for name in own_namespaces)
        raise DeniedError(
            f"a grant on {pattern!r} reaches outside this customer's namespaces: "
            f"use a pattern under {choices or 'its namespace'}, or ask the vendor "
            "for access to other namespaces"
        )
    return pattern


async def add_grant(
    identity: IdentityStore,
    customer_slug: str,
    pattern: str,
    role: str,
    until: datetime | None,
    account_login: str | None = None,
    *,
    own_namespaces_only: bool = False,
    audit: AdminRecorder | None = None,
) -> int:
    """Grant a role on a pattern to a whole customer, or to one of its accounts.

    With `own_namespaces_only` (a customer's owner granting, not the vendor), the
    pattern must stay inside the customer's own namespaces."""
    change = _create_grant(
        identity,
        customer_slug,
        pattern,
        role,
        until,
        account_login,
        own_namespaces_only,
    )
    if audit is None:
        return await change
    target = (
        f"{role} on {pattern} to {account_login or customer_slug}, "
        f"until {describe_time(until)}"
    )
    return await audit.run(GRANT_ADD, target, change, customer_slug)


async def _create_grant(
    identity: IdentityStore,
    customer_slug: str,
    pattern: str,
    role: str,
    until: datetime | None,
    account_login: str | None,
    own_namespaces_only: bool,
) -> int:
    check_each(
        lambda: validate_pattern(pattern),
        lambda: check_role(role),
        lambda: check_future(until, "until"),
    )
    customer = await identity.get_customer(customer_slug)
    if own_namespaces_only:
        check_within_namespaces(pattern, await identity.namespaces_of(customer.id))
    account_id = None
    if account_login is not None:
        account = await identity.find_account(account_login)
        if account is None or account.customer_id != customer.id:
            raise NotFoundError(
                f"account {account_login!r} of {customer_slug!r} not found"
            )
        account_id = account.id
    return await identity.add_grant(customer.id, account_id, pattern, role, until)


async def remove_grant(
    identity: IdentityStore,
    customer_slug: str,
    grant_id: int,
    *,
    own_namespaces_only: bool = False,
    audit: AdminRecorder | None = None,
) -> None:
    """Remove one grant of a customer; with `own_namespaces_only`, only a grant
    inside the customer's own namespaces (the vendor's grants stay)."""
    change = _remove_grant(identity, customer_slug, grant_id, own_namespaces_only)
    if audit is None:
        return await change
    target = f"grant {grant_id} of {customer_slug}"
    return await audit.run(GRANT_REMOVE, target, change, customer_slug)


async def _remove_grant(
    identity: IdentityStore,
    customer_slug: str,
    grant_id: int,
    own_namespaces_only: bool,
) -> None:
    customer = await identity.get_customer(customer_slug)
    if not 1 <= grant_id <= MAX_ROW_ID:
        raise NotFoundError(f"grant {grant_id} of {customer_slug!r} not found")
    if own_namespaces_only:
        found = [g for g in await identity.list_grants(customer.id) if g.id == grant_id]
        if found:
            namespaces = await identity.namespaces_of(customer.id)
            check_within_namespaces(found[0].pattern, namespaces)
    if not await identity.remove_grant(customer.id, grant_id):
        raise NotFoundError(f"grant {grant_id} of {customer_slug!r} not found")


async def set_customer_active(
    identity: IdentityStore, customer_slug: str, active: bool
) -> bool:
    """Resume or suspend a customer; suspending rejects all its tokens now.

    Returns False when the customer already had that status.
    """
    customer = await identity.get_customer(customer_slug)
    status = "active" if active else "suspended"
    await identity.set_customer_status(customer.id, status)
    return customer.status != status


@dataclass(frozen=True, slots=True)
class Resumed:
    """What resuming a customer changed."""

    # False when the customer was active already.
    changed: bool
    # The deletion of its repositories that was scheduled and is now cancelled.
    cancelled_deletion: datetime | None


async def resume_customer(identity: IdentityStore, customer_slug: str) -> Resumed:
    """Let a suspended customer log in again, and cancel the deletion of its
    repositories that `customer offboard --delete-after` scheduled."""
    customer = await identity.get_customer(customer_slug)
    scheduled = await identity.delete_after(customer.id)
    await identity.set_customer_status(customer.id, "active")
    if scheduled is not None:
        await identity.set_delete_after(customer.id, None)
    return Resumed(customer.status != "active", scheduled)


async def schedule_deletion(
    identity: IdentityStore, customer_slug: str, when: datetime
) -> datetime | None:
    """Record when the customer's repositories are deleted; return the date
    that this replaces, if any."""
    customer = await identity.get_customer(customer_slug)
    previous = await identity.delete_after(customer.id)
    await identity.set_delete_after(customer.id, when)
    return previous


async def shred_customer(
    identity: IdentityStore,
    driver: EncryptedDriver,
    customer_slug: str,
    manifests: RegistryStore | None = None,
) -> ShredReport:
    """Destroy a suspended or expired customer's key-encryption key for good.

    Blobs that only this customer referenced can no longer be decrypted, here
    or from any copy of the blob store; blobs that other customers or the
    vendor also reference stay readable through their wraps. With `manifests`,
    the manifests of the customer's repositories become unreadable too, here
    and in copies of the database made afterwards.
    """
    customer = await identity.get_customer(customer_slug)
    ended = customer.access_until is not None and customer.access_until <= (
        datetime.now(UTC)
    )
    if customer.status != "suspended" and not ended:
        raise ConflictError(
            f"customer {customer_slug!r} is active; suspend it first "
            f"(moorage customer suspend {customer_slug}) or let its contract end"
        )
    return await shred_owner(driver, customer_owner(customer_slug), manifests)
