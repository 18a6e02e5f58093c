"""Queries for customers, namespaces, accounts, grants and signing keys."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Executable, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from moorage.db.dialects import insert_ignore
from moorage.db.identity_revision import RevisionCache, revision_reader
from moorage.db.schema import (
    accounts,
    customers,
    grants,
    identity_revision,
    namespaces,
    personal_tokens,
    refresh_tokens,
    repositories,
    server_keys,
    signing_keys,
    utcnow,
)
from moorage.db.transactions import begin, connect
from moorage.errors import ConflictError, LastOwnerError, NotFoundError

if TYPE_CHECKING:
    from moorage.db.registry_store import ContentCodec


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    id: int
    slug: str
    display_name: str
    status: str
    access_until: datetime | None
    created_at: datetime


# The columns of a CustomerRecord, in its order.
_CUSTOMER_COLUMNS = (
    customers.c.id,
    customers.c.slug,
    customers.c.display_name,
    customers.c.status,
    customers.c.access_until,
    customers.c.created_at,
)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """An account joined with the state of its customer (None for the vendor)."""

    id: int
    login: str
    kind: str
    role: str | None
    secret_hash: str
    disabled: bool
    expires_at: datetime | None
    token_generation: int
    customer_id: int | None
    customer_slug: str | None
    customer_status: str | None
    customer_access_until: datetime | None
    # A robot's secret before its last rotation (keyed hash); never accepted.
    previous_secret_hash: str | None = None


@dataclass(frozen=True, slots=True)
class GrantRecord:
    id: int
    customer_id: int | None
    account_id: int | None
    pattern: str
    role: str
    until: datetime | None


@dataclass(frozen=True, slots=True)
class CustomerGrant:
    """A grant with the slug of its customer and, for a grant to one account,
    that account's login."""

    grant: GrantRecord
    customer_slug: str
    account_login: str | None


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    kid: str
    algorithm: str
    private_key: str
    created_at: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PersonalTokenRecord:
    id: int
    account_id: int
    name: str
    secret_hash: str
    role: str
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    # Grant patterns the token is limited to; None: no limit beyond the role.
    repositories: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AccountAccess:
    """An account with its grants and its customer's namespaces."""

    account: AccountRecord
    grants: list[GrantRecord]
    namespaces: list[str]


_GRANT_COLUMNS = (
    grants.c.id,
    grants.c.customer_id,
    grants.c.account_id,
    grants.c.pattern,
    grants.c.role,
    grants.c.until,
)
_SIGNING_KEY_COLUMNS = (
    signing_keys.c.kid,
    signing_keys.c.algorithm,
    signing_keys.c.private_key,
    signing_keys.c.created_at,
    signing_keys.c.retired_at,
)


_ACCOUNT_COLUMNS = (
    accounts.c.id,
    accounts.c.login,
    accounts.c.kind,
    accounts.c.role,
    accounts.c.secret_hash,
    accounts.c.disabled,
    accounts.c.expires_at,
    accounts.c.token_generation,
    accounts.c.customer_id,
    customers.c.slug,
    customers.c.status,
    customers.c.access_until,
    accounts.c.previous_secret_hash,
)


def _account(row: Any) -> AccountRecord:
    return AccountRecord(*row)


async def _read_revision(connection: AsyncConnection) -> int:
    value = await connection.scalar(
        select(identity_revision.c.revision).where(identity_revision.c.id == 1)
    )
    return int(value or 0)


def _personal_token(row: Any) -> PersonalTokenRecord:
    """Build a record from a personal_tokens row, splitting its patterns."""
    columns = dict(row._mapping)
    stored = columns.pop("repositories")
    patterns = None if stored is None else tuple(stored.split())
    return PersonalTokenRecord(**columns, repositories=patterns)


def _grants_condition(account_id: int, customer_id: int | None) -> Any:
    """Select the grants of an account and of its whole customer."""
    condition = grants.c.account_id == account_id
    if customer_id is None:
        return condition
    return or_(
        condition,
        (grants.c.customer_id == customer_id) & grants.c.account_id.is_(None),
    )


def _managers_of(customer_id: int | None) -> ColumnElement[bool]:
    """Select the accounts that can manage a customer's accounts (its active
    owners) or, for customer_id None, the installation (active vendor admins).

    Disabled and expired accounts cannot log in, so they do not count.
    """
    if customer_id is None:
        scope = accounts.c.customer_id.is_(None) & (accounts.c.role == "admin")
    else:
        scope = (accounts.c.customer_id == customer_id) & (accounts.c.role == "owner")
    return (
        scope
        & accounts.c.disabled.is_(False)
        & or_(accounts.c.expires_at.is_(None), accounts.c.expires_at > utcnow())
    )


def _last_owner_error(row: Any) -> LastOwnerError:
    if row.customer_id is None:
        # Vendor accounts are managed with the command line only.
        return LastOwnerError(
            f"{row.login!r} is the last active vendor admin, so no vendor account "
            "could change customers through the admin API: add another with "
            "`moorage user add - NAME --role admin` first, or pass --force"
        )
    return LastOwnerError(
        f"{row.kind} {row.login!r} is the last active owner of customer "
        f"{row.slug!r}: make another account owner first, or have a vendor admin "
        "force the change"
    )


async def _change_keeping_a_manager(
    connection: AsyncConnection, account_id: int, statements: Sequence[Executable]
) -> None:
    """Run statements that change an account; raise LastOwnerError (and roll
    back) when they leave its customer or the installation with no manager.

    On PostgreSQL, the manager rows are locked first, so two owners demoting each
    other at the same time are applied one after the other, and the second is
    rejected. On SQLite, the first write takes the database's write lock, so the
    count after the change reads every committed change.
    """
    target = (
        await connection.execute(
            select(
                accounts.c.customer_id,
                accounts.c.login,
                accounts.c.kind,
                customers.c.slug,
            )
            .select_from(accounts.outerjoin(customers))
            .where(accounts.c.id == account_id)
        )
    ).first()
    if target is None:
        for statement in statements:
            await connection.execute(statement)
        return
    managers = _managers_of(target.customer_id)
    locked = await connection.execute(
        select(accounts.c.id).where(managers).order_by(accounts.c.id).with_for_update()
    )
    was_manager = account_id in set(locked.scalars())
    for statement in statements:
        await connection.execute(statement)
    if not was_manager:
        return
    remaining = await connection.scalar(
        select(func.count()).select_from(accounts).where(managers)
    )
    if not remaining:
        raise _last_owner_error(target)


# Accounts and personal access tokens whose rows each process keeps while the
# identity revision holds; about 2 KiB each.
CACHED_IDENTITIES = 4096


class IdentityStore:
    """Who exists and what they were granted.

    Every method is one transaction, or joins the open unit of work (see
    `moorage.db.transactions`).

    `account_access` and `get_personal_token` return results from a per-process cache
    while the identity revision is unchanged (see moorage.db.identity_revision).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Seals server keys (see `server_key`); set when encryption is set up.
        self.codec: ContentCodec | None = None
        self.revision = revision_reader(engine)
        self._access_cache: RevisionCache[str, AccountAccess] = RevisionCache(
            CACHED_IDENTITIES
        )
        self._token_cache: RevisionCache[int, PersonalTokenRecord] = RevisionCache(
            CACHED_IDENTITIES
        )

    def close(self) -> None:
        self.revision.close()

    # Customers and namespaces

    async def create_customer(
        self, slug: str, display_name: str, access_until: datetime | None
    ) -> CustomerRecord:
        """Create a customer and its namespace of the same name."""
        now = utcnow()
        try:
            async with begin(self.engine) as connection:
                taken = await connection.scalar(
                    select(namespaces.c.name).where(namespaces.c.name == slug)
                )
                if taken is not None:
                    raise ConflictError(f"namespace {slug!r} is already taken")
                # Repositories pushed by the vendor into a namespace no customer
                # owns (such as products/) must not pass to a new customer.
                existing = await connection.scalar(
                    select(repositories.c.name)
                    .where(repositories.c.namespace == slug)
                    .limit(1)
                )
                if existing is not None:
                    raise ConflictError(
                        f"namespace {slug!r} already contains repositories, such as "
                        f"{existing!r}: choose another slug for the customer"
                    )
                customer_id = (
                    await connection.execute(
                        customers.insert()
                        .values(
                            slug=slug,
                            display_name=display_name,
                            status="active",
                            access_until=access_until,
                            created_at=now,
                        )
                        .returning(customers.c.id)
                    )
                ).scalar_one()
                await connection.execute(
                    namespaces.insert().values(
                        name=slug, customer_id=customer_id, created_at=now
                    )
                )
        except IntegrityError:
            raise ConflictError(f"customer {slug!r} already exists") from None
        return CustomerRecord(
            customer_id, slug, display_name, "active", access_until, now
        )

    async def get_customer(self, slug: str) -> CustomerRecord:
        async with connect(self.engine) as connection:
            row = (
                await connection.execute(
                    select(*_CUSTOMER_COLUMNS).where(customers.c.slug == slug)
                )
            ).first()
        if row is None:
            raise NotFoundError(f"customer {slug!r} not found")
        return CustomerRecord(*row)

    async def list_customers(self) -> list[CustomerRecord]:
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(*_CUSTOMER_COLUMNS).order_by(customers.c.slug)
            )
            return [CustomerRecord(*row) for row in result]

    async def namespaces_of(self, customer_id: int) -> list[str]:
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(namespaces.c.name)
                .where(namespaces.c.customer_id == customer_id)
                .order_by(namespaces.c.name)
            )
            return [row[0] for row in result]

    async def namespace_customer(self, name: str) -> str | None:
        """Return the slug of the customer that owns namespace `name`, if any."""
        async with connect(self.engine) as connection:
            return (
                await connection.execute(
                    select(customers.c.slug)
                    .select_from(namespaces.join(customers))
                    .where(namespaces.c.name == name)
                )
            ).scalar()

    # Accounts

    async def create_account(
        self,
        *,
        login: str,
        customer_id: int | None,
        kind: str,
        role: str | None,
        secret_hash: str,
        expires_at: datetime | None = None,
    ) -> int:
        now = utcnow()
        try:
            async with begin(self.engine) as connection:
                return (
                    await connection.execute(
                        accounts.insert()
                        .values(
                            login=login,
                            customer_id=customer_id,
                            kind=kind,
                            role=role,
                            secret_hash=secret_hash,
                            disabled=False,
                            expires_at=expires_at,
                            token_generation=0,
                            created_at=now,
                        )
                        .returning(accounts.c.id)
                    )
                ).scalar_one()
        except IntegrityError:
            raise ConflictError(f"the login name {login!r} is already taken") from None

    async def account_access(self, login: str) -> AccountAccess | None:
        """Return an account with its grants and namespaces (every authenticated
        request needs all three), from the cache while the revision holds."""
        if "\0" in login:
            # No login contains NUL, and PostgreSQL rejects it in text values.
            return None
        revision = await self.revision.current()
        cached = self._access_cache.get(login, revision)
        if cached is not None:
            return cached
        loaded_at, access = await self._load_account_access(login)
        if access is not None:
            self._access_cache.put(login, access, loaded_at)
        return access

    def cached_customer(self, login: str) -> str | None:
        """Return the customer of `login`'s account from the access cache, with
        no database read, or None when the cache has no entry for it.

        The entry is as of the identity revision read last, so it may miss a
        change committed since then until the next `account_access` call.
        """
        cached = self._access_cache.peek(login)
        return cached.account.customer_slug if cached is not None else None

    async def _load_account_access(
        self, login: str
    ) -> tuple[int, AccountAccess | None]:
        """Load an account's access in one connection, after reading the revision
        (so the rows are at least as new as the revision returned)."""
        async with connect(self.engine) as connection:
            revision = await _read_revision(connection)
            row = (
                await connection.execute(
                    select(*_ACCOUNT_COLUMNS)
                    .select_from(accounts.outerjoin(customers))
                    .where(accounts.c.login == login)
                )
            ).first()
            if row is None:
                return revision, None
            account = _account(row)
            grant_rows = await connection.execute(
                select(*_GRANT_COLUMNS).where(
                    _grants_condition(account.id, account.customer_id)
                )
            )
            grant_records = [GrantRecord(*grant) for grant in grant_rows]
            names: list[str] = []
            if account.customer_id is not None:
                name_rows = await connection.execute(
                    select(namespaces.c.name)
                    .where(namespaces.c.customer_id == account.customer_id)
                    .order_by(namespaces.c.name)
                )
                names = [row[0] for row in name_rows]
        return revision, AccountAccess(account, grant_records, names)

    async def find_account(self, login: str) -> AccountRecord | None:
        return await self._account_where(accounts.c.login == login)

    async def get_account(self, account_id: int) -> AccountRecord | None:
        return await self._account_where(accounts.c.id == account_id)

    async def _account_where(self, condition: object) -> AccountRecord | None:
        async with connect(self.engine) as connection:
            row = (
                await connection.execute(
                    select(*_ACCOUNT_COLUMNS)
                    .select_from(accounts.outerjoin(customers))
                    .where(condition)  # type: ignore[arg-type]
                )
            ).first()
        return None if row is None else _account(row)

    async def list_accounts(self, customer_id: int | None) -> list[AccountRecord]:
        async with connect(self.engine) as connection:
            condition = (
                accounts.c.customer_id.is_(None)
                if customer_id is None
                else accounts.c.customer_id == customer_id
            )
            result = await connection.execute(
                select(*_ACCOUNT_COLUMNS)
                .select_from(accounts.outerjoin(customers))
                .where(condition)
                .order_by(accounts.c.login)
            )
            return [_account(row) for row in result]

    async def has_vendor_admin(self) -> bool:
        async with connect(self.engine) as connection:
            found = await connection.scalar(
                select(accounts.c.id).where(
                    accounts.c.customer_id.is_(None), accounts.c.role == "admin"
                )
            )
        return found is not None

    async def set_secret(
        self,
        account_id: int,
        secret_hash: str,
        *,
        revoke_personal_tokens: bool = False,
    ) -> None:
        """Replace an account's secret and reject every token issued before now.

        With `revoke_personal_tokens`, the account's personal access tokens are
        revoked in the same transaction: they are checked by their own id, not
        by the token generation, so a new secret alone leaves them working.
        """
        async with begin(self.engine) as connection:
            await connection.execute(
                update(accounts)
                .where(accounts.c.id == account_id)
                .values(
                    secret_hash=secret_hash,
                    token_generation=accounts.c.token_generation + 1,
                )
            )
            if revoke_personal_tokens:
                await connection.execute(
                    update(personal_tokens)
                    .where(
                        personal_tokens.c.account_id == account_id,
                        personal_tokens.c.revoked_at.is_(None),
                    )
                    .values(revoked_at=utcnow())
                )

    async def rotate_secret(self, account_id: int, secret_hash: str) -> None:
        """Replace a robot's secret, keep the old one's keyed hash as the previous
        secret (to recognise its use), and reject every token issued before now."""
        async with begin(self.engine) as connection:
            await connection.execute(
                update(accounts)
                .where(accounts.c.id == account_id)
                .values(
                    previous_secret_hash=accounts.c.secret_hash,
                    secret_hash=secret_hash,
                    token_generation=accounts.c.token_generation + 1,
                )
            )

    async def replace_password_hash(
        self, account_id: int, old_hash: str, new_hash: str
    ) -> bool:
        """Swap a password's hash for one of the same password, unless the
        password changed meanwhile; issued tokens stay valid."""
        async with begin(self.engine) as connection:
            result = await connection.execute(
                update(accounts)
                .where(accounts.c.id == account_id, accounts.c.secret_hash == old_hash)
                .values(secret_hash=new_hash)
            )
        return result.rowcount > 0

    async def set_expiry(self, account_id: int, expires_at: datetime | None) -> None:
        async with begin(self.engine) as connection:
            await connection.execute(
                update(accounts)
                .where(accounts.c.id == account_id)
                .values(expires_at=expires_at)
            )

    async def set_role(
        self, account_id: int, role: str, *, keep_an_owner: bool = False
    ) -> None:
        """Change an account's role on its customer's own namespaces.

        With `keep_an_owner`, raise LastOwnerError instead of demoting the
        customer's last active owner.
        """
        change = update(accounts).where(accounts.c.id == account_id).values(role=role)
        await self._change_account(account_id, [change], keep_an_owner)

    async def set_disabled(
        self, account_id: int, disabled: bool, *, keep_an_owner: bool = False
    ) -> None:
        """Disable or enable an account; disabling also rejects its tokens for good,
        so enabling it again does not revive them.

        With `keep_an_owner`, raise LastOwnerError instead of disabling the last
        active owner of a customer or the last active vendor admin.
        """
        values: dict[str, Any] = {"disabled": disabled}
        if disabled:
            values["token_generation"] = accounts.c.token_generation + 1
        change = update(accounts).where(accounts.c.id == account_id).values(**values)
        await self._change_account(account_id, [change], keep_an_owner)

    async def delete_account(
        self, account_id: int, *, keep_an_owner: bool = False
    ) -> None:
        """Delete an account with its grants, personal access and refresh tokens.

        With `keep_an_owner`, raise LastOwnerError instead of deleting the last
        active owner of a customer or the last active vendor admin.
        """
        statements = [
            delete(grants).where(grants.c.account_id == account_id),
            delete(refresh_tokens).where(refresh_tokens.c.account_id == account_id),
            delete(personal_tokens).where(personal_tokens.c.account_id == account_id),
            delete(accounts).where(accounts.c.id == account_id),
        ]
        await self._change_account(account_id, statements, keep_an_owner)

    async def _change_account(
        self,
        account_id: int,
        statements: Sequence[Executable],
        keep_an_owner: bool,
    ) -> None:
        async with begin(self.engine) as connection:
            if keep_an_owner:
                await _change_keeping_a_manager(connection, account_id, statements)
                return
            for statement in statements:
                await connection.execute(statement)

    async def delete_after(self, customer_id: int) -> datetime | None:
        """Return when `customer offboard --delete-after` deletes the customer's
        repositories, or None."""
        async with connect(self.engine) as connection:
            value: datetime | None = await connection.scalar(
                select(customers.c.delete_after).where(customers.c.id == customer_id)
            )
            return value

    async def set_delete_after(self, customer_id: int, when: datetime | None) -> None:
        """Schedule the deletion of a customer's repositories, or cancel it (None)."""
        async with begin(self.engine) as connection:
            await connection.execute(
                update(customers)
                .where(customers.c.id == customer_id)
                .values(delete_after=when)
            )

    async def set_customer_status(self, customer_id: int, status: str) -> None:
        """Set a customer active or suspended; suspending also rejects every token
        of its accounts for good."""
        async with begin(self.engine) as connection:
            await connection.execute(
                update(customers)
                .where(customers.c.id == customer_id)
                .values(status=status)
            )
            if status != "active":
                await connection.execute(
                    update(accounts)
                    .where(accounts.c.customer_id == customer_id)
                    .values(token_generation=accounts.c.token_generation + 1)
                )

    # Personal access tokens

    async def add_personal_token(
        self,
        account_id: int,
        name: str,
        secret_hash: str,
        role: str,
        expires_at: datetime | None,
        repositories: Sequence[str] | None = None,
    ) -> int:
        """Add a personal access token; `repositories` (grant patterns, None for
        no limit) limits the repositories it may act on."""
        async with begin(self.engine) as connection:
            return (
                await connection.execute(
                    personal_tokens.insert()
                    .values(
                        account_id=account_id,
                        name=name,
                        secret_hash=secret_hash,
                        role=role,
                        expires_at=expires_at,
                        created_at=utcnow(),
                        repositories=(
                            None if repositories is None else " ".join(repositories)
                        ),
                    )
                    .returning(personal_tokens.c.id)
                )
            ).scalar_one()

    async def get_personal_token(self, token_id: int) -> PersonalTokenRecord | None:
        """Return a personal access token, from the cache while the revision holds."""
        revision = await self.revision.current()
        cached = self._token_cache.get(token_id, revision)
        if cached is not None:
            return cached
        async with connect(self.engine) as connection:
            loaded_at = await _read_revision(connection)
            row = (
                await connection.execute(
                    select(personal_tokens).where(personal_tokens.c.id == token_id)
                )
            ).first()
        if row is None:
            return None
        token = _personal_token(row)
        self._token_cache.put(token_id, token, loaded_at)
        return token

    async def list_personal_tokens(self, account_id: int) -> list[PersonalTokenRecord]:
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(personal_tokens)
                .where(personal_tokens.c.account_id == account_id)
                .order_by(personal_tokens.c.id)
            )
            return [_personal_token(row) for row in result]

    async def revoke_personal_token(self, token_id: int) -> None:
        async with begin(self.engine) as connection:
            await connection.execute(
                update(personal_tokens)
                .where(
                    personal_tokens.c.id == token_id,
                    personal_tokens.c.revoked_at.is_(None),
                )
                .values(revoked_at=utcnow())
            )

    # Grants

    async def add_grant(
        self,
        customer_id: int,
        account_id: int | None,
        pattern: str,
        role: str,
        until: datetime | None,
    ) -> int:
        async with begin(self.engine) as connection:
            return (
                await connection.execute(
                    grants.insert()
                    .values(
                        customer_id=customer_id,
                        account_id=account_id,
                        pattern=pattern,
                        role=role,
                        until=until,
                        created_at=utcnow(),
                    )
                    .returning(grants.c.id)
                )
            ).scalar_one()

    async def list_grants(self, customer_id: int) -> list[GrantRecord]:
        """Return every grant of a customer: customer-wide and to its accounts."""
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(*_GRANT_COLUMNS)
                .where(grants.c.customer_id == customer_id)
                .order_by(grants.c.id)
            )
            return [GrantRecord(*row) for row in result]

    async def list_customer_grants(self) -> list[CustomerGrant]:
        """Return the grants of every customer, by grant id."""
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(*_GRANT_COLUMNS, customers.c.slug, accounts.c.login)
                .select_from(
                    grants.join(
                        customers, grants.c.customer_id == customers.c.id
                    ).outerjoin(accounts, grants.c.account_id == accounts.c.id)
                )
                .order_by(grants.c.id)
            )
            return [
                CustomerGrant(GrantRecord(*row[:-2]), row[-2], row[-1])
                for row in result
            ]

    async def remove_grant(self, customer_id: int, grant_id: int) -> bool:
        """Delete one grant of a customer; return False when there is none."""
        async with begin(self.engine) as connection:
            result = await connection.execute(
                delete(grants).where(
                    grants.c.id == grant_id, grants.c.customer_id == customer_id
                )
            )
        return bool(result.rowcount)

    # Grants

    async def grants_for(
        self, account_id: int, customer_id: int | None
    ) -> list[GrantRecord]:
        """Return the grants of an account and of its whole customer."""
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(*_GRANT_COLUMNS).where(
                    _grants_condition(account_id, customer_id)
                )
            )
            return [GrantRecord(*row) for row in result]

    # Token signing keys

    async def active_signing_keys(self) -> list[SigningKeyRecord]:
        """Return keys not yet retired (including those in their overlap window),
        newest first."""
        now = utcnow()
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(*_SIGNING_KEY_COLUMNS)
                .where(
                    or_(
                        signing_keys.c.retired_at.is_(None),
                        signing_keys.c.retired_at > now,
                    )
                )
                .order_by(signing_keys.c.created_at.desc())
            )
            return [SigningKeyRecord(*row) for row in result]

    async def list_signing_keys(self) -> list[SigningKeyRecord]:
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(*_SIGNING_KEY_COLUMNS).order_by(signing_keys.c.created_at.desc())
            )
            return [SigningKeyRecord(*row) for row in result]

    async def add_signing_key(
        self,
        kid: str,
        algorithm: str,
        private_key: str,
        retire_others_at: datetime | None = None,
    ) -> None:
        """Add a signing key; keys still in use stop verifying at `retire_others_at`
        (None leaves them as they are)."""
        async with begin(self.engine) as connection:
            if retire_others_at is not None:
                await connection.execute(
                    update(signing_keys)
                    .where(
                        or_(
                            signing_keys.c.retired_at.is_(None),
                            signing_keys.c.retired_at > retire_others_at,
                        )
                    )
                    .values(retired_at=retire_others_at)
                )
            await connection.execute(
                signing_keys.insert().values(
                    kid=kid,
                    algorithm=algorithm,
                    private_key=private_key,
                    created_at=utcnow(),
                )
            )

    async def replace_private_key(self, kid: str, old: str, new: str) -> bool:
        """Store `new` as the private key of `kid` if it is still `old`; return
        whether it was replaced."""
        async with begin(self.engine) as connection:
            result = await connection.execute(
                update(signing_keys)
                .where(signing_keys.c.kid == kid)
                .where(signing_keys.c.private_key == old)
                .values(private_key=new)
            )
        return bool(result.rowcount)

    # Server keys

    async def server_key(self, name: str, size: int = 32) -> bytes:
        """Return the named server key, creating a random one on first use.

        With a `codec`, the key is stored sealed by the database key, and a key
        stored in the clear before encryption was on is sealed when read.
        """
        context = f"server-key:{name}"
        async with connect(self.engine) as connection:
            found = await connection.scalar(
                select(server_keys.c.material).where(server_keys.c.name == name)
            )
        if found is not None:
            stored = bytes(found)
            if self.codec is None:
                return stored
            if not self.codec.is_sealed(stored):
                await self._seal_server_key(name, stored, context)
                return stored
            return self.codec.open(stored, context)
        # When another process created the key first, the insert does nothing
        # and the second read returns theirs. No IntegrityError is raised, so a
        # unit of work that calls this stays usable on PostgreSQL.
        material = secrets.token_bytes(size)
        if self.codec is not None:
            material = self.codec.seal(material, context)
        async with begin(self.engine) as connection:
            await insert_ignore(
                connection,
                server_keys,
                {"name": name, "material": material, "created_at": utcnow()},
            )
        return await self.server_key(name, size)

    async def seal_server_keys(self) -> int:
        """Seal every server key stored in the clear, as a new installation
        stores it; return how many were sealed. Does nothing without a codec or
        while encryption of new data is off."""
        if self.codec is None:
            return 0
        async with connect(self.engine) as connection:
            rows = (
                await connection.execute(
                    select(server_keys.c.name, server_keys.c.material)
                )
            ).all()
        sealed = 0
        for name, material in rows:
            stored = bytes(material)
            if self.codec.is_sealed(stored):
                continue
            if await self._seal_server_key(name, stored, f"server-key:{name}"):
                sealed += 1
        return sealed

    async def _seal_server_key(self, name: str, clear: bytes, context: str) -> bool:
        assert self.codec is not None
        sealed = self.codec.seal(clear, context)
        if not self.codec.is_sealed(sealed):
            return False  # encryption of new data is off
        async with begin(self.engine) as connection:
            result = await connection.execute(
                update(server_keys)
                .where(server_keys.c.name == name)
                .where(server_keys.c.material == clear)
                .values(material=sealed)
            )
        return bool(result.rowcount)
