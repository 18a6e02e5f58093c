"""Commands for accounts, robots, personal access tokens, grants and keys.

`moorage.cli.main` imports this module at its end; the commands register
themselves on its Typer apps.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated

import structlog
import typer
from rich import box
from rich.table import Column
from sqlalchemy.exc import SQLAlchemyError

from moorage import admin
from moorage.audit import events as actions
from moorage.auth.tokens import add_signing_key
from moorage.cli.main import (
    DATE_FORMS,
    DataDirOption,
    _audited,
    _encrypted_driver,
    _parse_date,
    _parse_end_date,
    _recorder,
    _run,
    _settings,
    app,
    console,
    customer_app,
    errors,
    records_rejections,
    reject,
    reject_invalid,
    user_app,
)
from moorage.cli.output import Table, lines_cell, shown
from moorage.db.identity_store import AccountRecord, GrantRecord, PersonalTokenRecord
from moorage.db.refresh_token_store import RefreshTokenRecord
from moorage.db.wipe import wipe_deleted_keys
from moorage.errors import InvalidInputError
from moorage.services import Services
from moorage.storage.encryption.maintenance import ShredReport

log = structlog.get_logger(__name__)

robot_app = typer.Typer(help="Manage customers' robot accounts.", no_args_is_help=True)
token_app = typer.Typer(
    help="Manage users' personal access tokens.", no_args_is_help=True
)
grant_app = typer.Typer(
    help="Grant customers roles on repository patterns.", no_args_is_help=True
)
signing_key_app = typer.Typer(
    help="Rotate and list the token signing keys.", no_args_is_help=True
)
refresh_app = typer.Typer(
    help="List and revoke the OAuth2 refresh tokens of a user or robot.",
    no_args_is_help=True,
)
app.add_typer(robot_app, name="robot")
app.add_typer(token_app, name="token")
token_app.add_typer(refresh_app, name="refresh")
app.add_typer(grant_app, name="grant")
app.add_typer(signing_key_app, name="signing-key")

CustomerArgument = Annotated[
    str, typer.Argument(help="Customer slug, or '-' for the vendor's own accounts.")
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Make the change even when it leaves the customer without an active "
        "owner, or the installation without an active vendor admin.",
    ),
]
_DURATION = re.compile(r"(\d+)([dhm])")
EXPIRY_FORMS = (
    "a duration such as 90d, 12h or 30m (days, hours, minutes), or " + DATE_FORMS
)
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_expiry(value: str | None) -> datetime | None:
    """Parse `90d`, `12h`, `30m` or a date (YYYY-MM-DD) into a UTC time.

    Exit with the admin API's message when the time is not in the future.
    """
    expires_at = _parse_expiry_time(value)
    try:
        return admin.check_future(expires_at, "--expires")
    except InvalidInputError as error:
        reject(error.message)


def _parse_expiry_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    match = _DURATION.fullmatch(value)
    if match:
        try:
            amount = {_UNITS[match.group(2)]: int(match.group(1))}
            return datetime.now(UTC) + timedelta(**amount)
        except (OverflowError, ValueError):
            reject(f"expiry {value!r} is past the year 9999; use a shorter one")
    return _parse_date(value, EXPIRY_FORMS, "expiry")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def _print_secret(label: str, secret: str) -> None:
    console.print(f"{label} (shown once, store it now):")
    print(secret)


# Customers


@customer_app.command("suspend")
def customer_suspend(customer: str, data_dir: DataDirOption = None) -> None:
    """Stop every login and token of a customer at once."""
    changed = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.CUSTOMER_SUSPEND,
            f"customer {customer}",
            customer,
            admin.set_customer_active(s.identity, customer, False),
        ),
    )
    if not changed:
        console.print(f"customer {customer} was already suspended; nothing changed")
        return
    console.print(f"customer {customer} suspended; its tokens no longer work")


@customer_app.command("resume")
def customer_resume(customer: str, data_dir: DataDirOption = None) -> None:
    """Let a suspended customer's accounts log in again, and cancel the
    deletion of its repositories that `customer offboard --delete-after`
    scheduled."""
    resumed = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.CUSTOMER_RESUME,
            f"customer {customer}",
            customer,
            admin.resume_customer(s.identity, customer),
            _describe_resumed,
        ),
    )
    if resumed.cancelled_deletion is not None:
        console.print(
            f"the deletion of the repositories of customer {customer}, scheduled "
            f"for {resumed.cancelled_deletion:%Y-%m-%d %H:%M} UTC, is cancelled",
            highlight=False,
        )
    if not resumed.changed:
        console.print(f"customer {customer} is not suspended; nothing changed")
        return
    console.print(f"customer {customer} resumed; its accounts must log in again")


def _describe_resumed(resumed: admin.Resumed) -> str:
    if resumed.cancelled_deletion is None:
        return "resumed" if resumed.changed else "was active"
    return (
        "scheduled deletion of its repositories for "
        f"{resumed.cancelled_deletion:%Y-%m-%d %H:%M} UTC cancelled"
    )


@customer_app.command("shred")
@records_rejections(actions.CUSTOMER_SHRED, "customer shred")
def customer_shred(
    customer: str,
    confirm: Annotated[
        bool,
        typer.Option(
            "--confirm",
            help="Required: destroy the customer's key; this cannot be undone.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Destroy a suspended customer's encryption key: its manifests and own blobs
    become unreadable everywhere, blobs shared with others stay readable."""
    if not confirm:
        reject(
            f"shredding destroys the key of customer {customer} for good; run "
            "again with --confirm to do it"
        )

    async def shred_and_wipe(services: Services) -> tuple[ShredReport, bool]:
        report = await _audited(
            services,
            actions.CUSTOMER_SHRED,
            f"customer {customer} key-encryption key",
            customer,
            admin.shred_customer(
                services.identity,
                _encrypted_driver(services),
                customer,
                services.registry.store,
            ),
            _describe_shred,
        )
        # After the commit: the checkpoint or VACUUM must see the deletes.
        try:
            return report, await wipe_deleted_keys(services.engine)
        except SQLAlchemyError as error:
            log.debug("database error", exc_info=error)
            return report, False

    report, wiped = _run(_settings(data_dir=data_dir), shred_and_wipe)
    console.print(
        f"customer {customer}: {_describe_shred(report)}. Restart running servers "
        "to drop the key from their memory."
    )
    if not wiped:
        errors.print(
            "warning: the database files may still contain the destroyed key, "
            "because the WAL checkpoint (SQLite) or VACUUM FULL sealed_keys "
            "(PostgreSQL) failed; run `PRAGMA wal_checkpoint(TRUNCATE)` or "
            "`VACUUM FULL sealed_keys` when the database is idle",
            highlight=False,
            soft_wrap=True,
        )


def _describe_shred(report: ShredReport) -> str:
    outcome = "key destroyed" if report.key_destroyed else "had no key"
    return (
        f"{outcome}, {report.wraps_deleted} data key wraps deleted, "
        f"{report.objects_unreadable} objects now unreadable "
        f"({report.blobs_unreadable} of them blobs), "
        f"{report.manifests_unreadable} manifests now unreadable"
    )


# Users


@user_app.command("disable")
def user_disable(
    customer: CustomerArgument,
    name: str,
    force: ForceOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Disable a user; its tokens stop working on the next request."""
    changed = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.USER_DISABLE,
            admin.forced(f"user {name} of {customer}", force),
            customer,
            admin.set_enabled(s.identity, customer, name, "user", False, force=force),
        ),
    )
    console.print(
        f"user {name} disabled"
        if changed
        else f"user {name} was already disabled; nothing changed"
    )


@user_app.command("enable")
def user_enable(
    customer: CustomerArgument, name: str, data_dir: DataDirOption = None
) -> None:
    """Enable a disabled user again (it must log in again)."""
    changed = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.USER_ENABLE,
            f"user {name} of {customer}",
            customer,
            admin.set_enabled(s.identity, customer, name, "user", True),
        ),
    )
    console.print(
        f"user {name} enabled"
        if changed
        else f"user {name} is not disabled; nothing changed"
    )


@user_app.command("reset-password")
def user_reset_password(
    customer: CustomerArgument, name: str, data_dir: DataDirOption = None
) -> None:
    """Give a user a generated password; the old one and its tokens stop working."""
    created = _run(
        _settings(data_dir=data_dir),
        lambda s: admin.reset_password(s.identity, customer, name, audit=_recorder(s)),
    )
    assert created.password is not None
    _print_secret(f"new password of user {created.login}", created.password)


RoleArgument = Annotated[
    str, typer.Argument(help="The new role: reader, writer, maintainer or owner.")
]


@user_app.command("role")
def user_role(
    customer: str,
    name: str,
    role: RoleArgument,
    force: ForceOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Change a user's role on its customer's namespaces, from the next request."""
    _run(
        _settings(data_dir=data_dir),
        lambda s: admin.set_role(
            s.identity, customer, name, "user", role, force=force, audit=_recorder(s)
        ),
    )
    console.print(f"user {name} of {customer} is now {role}")


@user_app.command("remove")
def user_remove(
    customer: CustomerArgument,
    name: str,
    force: ForceOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Delete a user with its grants and personal access tokens."""
    _run(
        _settings(data_dir=data_dir),
        lambda s: admin.remove_user(
            s.identity, customer, name, force=force, audit=_recorder(s)
        ),
    )
    console.print(f"user {name} removed")


@user_app.command("list")
def user_list(customer: CustomerArgument, data_dir: DataDirOption = None) -> None:
    """List a customer's users and robots."""

    async def action(services: Services) -> list[AccountRecord]:
        if customer == "-":
            return await services.identity.list_accounts(None)
        record = await services.identity.get_customer(customer)
        return await services.identity.list_accounts(record.id)

    accounts = _run(_settings(data_dir=data_dir), action)
    table = Table("login", "kind", "role", "state", "expires")
    for account in accounts:
        state = "disabled" if account.disabled else "active"
        table.add_row(
            account.login,
            account.kind,
            account.role or "-",
            state,
            _when(account.expires_at),
        )
    console.print(table)


# Robots


@robot_app.command("add")
@records_rejections(actions.ROBOT_ADD, "robot add")
def robot_add(
    customer: str,
    name: Annotated[
        str, typer.Argument(help="Robot name; its login is CUSTOMER+NAME.")
    ],
    role: Annotated[
        str, typer.Option(help="reader, writer, maintainer or owner on own namespaces.")
    ] = "reader",
    expires: Annotated[
        str | None,
        typer.Option(help="Secret expiry: 90d, 12h, 30m or a date (YYYY-MM-DD)."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Add a robot account. Prints its login and secret once."""
    reject_invalid(lambda: admin.robot_login(customer, name))
    reject_invalid(lambda: admin.check_role(role))
    until = parse_expiry(expires)
    created = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.ROBOT_ADD,
            f"robot {name} of {customer} as {role}, expires {_when(until)}",
            customer,
            admin.add_robot(s.identity, customer, name, role, until),
        ),
    )
    console.print(f"robot {created.login} added as {role}")
    assert created.password is not None
    _print_secret("secret", created.password)


@robot_app.command("list")
def robot_list(customer: str, data_dir: DataDirOption = None) -> None:
    """List a customer's robot accounts."""

    async def action(services: Services) -> list[AccountRecord]:
        record = await services.identity.get_customer(customer)
        accounts = await services.identity.list_accounts(record.id)
        return [account for account in accounts if account.kind == "robot"]

    table = Table("login", "role", "state", "expires")
    for account in _run(_settings(data_dir=data_dir), action):
        state = "disabled" if account.disabled else "active"
        table.add_row(
            account.login, account.role or "-", state, _when(account.expires_at)
        )
    console.print(table)


@robot_app.command("rotate")
@records_rejections(actions.ROBOT_ROTATE, "robot rotate")
def robot_rotate(
    customer: str,
    name: str,
    expires: Annotated[
        str | None,
        typer.Option(help="New secret's expiry: 90d, 12h, 30m or a date."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Give a robot a new secret; the old one and its tokens stop working now."""
    until = parse_expiry(expires)
    created = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.ROBOT_ROTATE,
            f"robot {name} of {customer}, expires {_when(until)}",
            customer,
            admin.rotate_robot(s.identity, customer, name, until),
        ),
    )
    assert created.password is not None
    _print_secret(f"new secret of {created.login}", created.password)


@robot_app.command("role")
def robot_role(
    customer: str,
    name: str,
    role: RoleArgument,
    force: ForceOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Change a robot's role on its customer's namespaces, from the next request."""
    login = admin.robot_login(customer, name)
    _run(
        _settings(data_dir=data_dir),
        lambda s: admin.set_role(
            s.identity, customer, login, "robot", role, force=force, audit=_recorder(s)
        ),
    )
    console.print(f"robot {login} is now {role}")


@robot_app.command("disable")
def robot_disable(
    customer: str,
    name: str,
    force: ForceOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Disable a robot; its tokens stop working on the next request."""
    login = admin.robot_login(customer, name)
    changed = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.ROBOT_DISABLE,
            admin.forced(f"robot {login}", force),
            customer,
            admin.set_enabled(s.identity, customer, login, "robot", False, force=force),
        ),
    )
    console.print(
        f"robot {login} disabled"
        if changed
        else f"robot {login} was already disabled; nothing changed"
    )


@robot_app.command("enable")
def robot_enable(customer: str, name: str, data_dir: DataDirOption = None) -> None:
    """Enable a disabled robot again."""
    login = admin.robot_login(customer, name)
    changed = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.ROBOT_ENABLE,
            f"robot {login}",
            customer,
            admin.set_enabled(s.identity, customer, login, "robot", True),
        ),
    )
    console.print(
        f"robot {login} enabled"
        if changed
        else f"robot {login} is not disabled; nothing changed"
    )


@robot_app.command("remove")
def robot_remove(
    customer: str,
    name: str,
    force: ForceOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Delete a robot account with its grants."""
    _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.ROBOT_REMOVE,
            admin.forced(f"robot {name} of {customer}", force),
            customer,
            admin.remove_robot(s.identity, customer, name, force=force),
        ),
    )
    console.print(f"robot {admin.robot_login(customer, name)} removed")


# Personal access tokens


@token_app.command("add")
@records_rejections(actions.PERSONAL_TOKEN_ADD, "token add")
def token_add(
    customer: CustomerArgument,
    user: str,
    name: Annotated[str, typer.Option(help="What the token is for.")] = "token",
    role: Annotated[
        str,
        typer.Option(help="Most the token may do: reader, writer or maintainer."),
    ] = "reader",
    expires: Annotated[
        str, typer.Option(help="Expiry: 90d, 12h, 30m or a date (YYYY-MM-DD).")
    ] = "90d",
    repository: Annotated[
        list[str] | None,
        typer.Option(
            help="Limit the token to repositories matching this grant pattern "
            "(acme/app, acme/ci-*, products); repeat for several. Default: "
            "every repository the user may access."
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a personal access token for a user. Prints it once."""
    for pattern in repository or ():
        reject_invalid(partial(admin.validate_pattern, pattern), "--repository: ")
    until = parse_expiry(expires)
    where = "all repositories" if not repository else " ".join(repository)
    created = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.PERSONAL_TOKEN_ADD,
            f"token {name!r} of {user} ({customer}), at most {role} on {where}, "
            f"until {_when(until)}",
            customer,
            admin.add_personal_token(
                s.identity, customer, user, name, role, until, repository or None
            ),
        ),
    )
    console.print(
        f"token {created.id} for {user}, at most {role} on {where}, "
        f"until {_when(until)}"
    )
    _print_secret("token", created.token)


@token_app.command("list")
def token_list(
    customer: CustomerArgument, user: str, data_dir: DataDirOption = None
) -> None:
    """List a user's personal access tokens (never the secrets)."""

    async def action(services: Services) -> list[PersonalTokenRecord]:
        account = await admin.find_account_of(services.identity, customer, user, "user")
        return await services.identity.list_personal_tokens(account.id)

    # One pattern a line, never cut short, since a pattern is a security limit.
    repositories = Column("repositories", overflow="fold")
    table = Table("id", "name", "role", repositories, "expires", "revoked", "created")
    for token in _run(_settings(data_dir=data_dir), action):
        table.add_row(
            str(token.id),
            token.name,
            token.role,
            "all" if token.repositories is None else "\n".join(token.repositories),
            _when(token.expires_at),
            _when(token.revoked_at),
            _when(token.created_at),
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    customer: CustomerArgument,
    user: str,
    token_id: int,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a personal access token; it stops working on the next request."""
    changed = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.PERSONAL_TOKEN_REVOKE,
            f"token {token_id} of {user} ({customer})",
            customer,
            admin.revoke_personal_token(s.identity, customer, user, token_id),
        ),
    )
    console.print(
        f"token {token_id} revoked"
        if changed
        else f"token {token_id} was already revoked; nothing changed"
    )


# Refresh tokens

LoginArgument = Annotated[
    str, typer.Argument(help="Login of a user, or of a robot (CUSTOMER+NAME).")
]


def _refresh_state(
    token: RefreshTokenRecord, account: AccountRecord, dead_personal_tokens: set[int]
) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at <= datetime.now(UTC):
        return "expired"
    if token.token_generation != account.token_generation:
        # The secret was rotated, or the account disabled or its customer
        # suspended, after this token was issued.
        return "superseded"
    if token.personal_token_id in dead_personal_tokens:
        return "superseded"
    return "active"


@refresh_app.command("list")
def refresh_list(
    customer: CustomerArgument,
    login: LoginArgument,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide",
            help="Also show the addresses each token was issued to and last used from.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """List the refresh tokens issued to an account (never the tokens).

    The table fits an 80-column terminal: each token takes two lines, its id
    above its state. `--wide` adds lines, not columns.
    """

    async def action(
        services: Services,
    ) -> tuple[AccountRecord, list[RefreshTokenRecord], set[int]]:
        account, tokens = await admin.list_refresh_tokens(
            services.identity, services.authenticator.refresh_tokens, customer, login
        )
        now = datetime.now(UTC)
        dead = {
            personal.id
            for personal in await services.identity.list_personal_tokens(account.id)
            if personal.revoked_at is not None
            or (personal.expires_at is not None and personal.expires_at <= now)
        }
        return account, tokens, dead

    account, tokens, dead_personal_tokens = _run(_settings(data_dir=data_dir), action)
    if not tokens:
        errors.print(f"{shown(login)} has no refresh tokens", highlight=False)
        return
    table = _refresh_table(wide)
    for token in tokens:
        state = _refresh_state(token, account, dead_personal_tokens)
        table.add_row(
            lines_cell(token.jti, state),
            token.client_id or "-",
            lines_cell(*_refresh_issue(token, wide)),
            lines_cell(*_refresh_last_use(token, wide)),
        )
    console.print(table)


def _refresh_table(wide: bool) -> Table:
    """Build the empty `token refresh list` table, which fits 80 columns."""
    table = Table(
        box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True
    )
    # The id is what `revoke` takes, so neither it nor the state is ever cut.
    table.add_column("id\nstate", no_wrap=True, min_width=32)
    # Client ids and IPv6 addresses have no spaces to break at, so they fold.
    # Each time is 16 characters, and the client gets the rest of the width.
    table.add_column("client", overflow="fold")
    issue = "issued\nfrom\nexpires" if wide else "issued\nexpires"
    table.add_column(issue, overflow="fold", width=16)
    last_use = "last used\nfrom" if wide else "last used"
    table.add_column(last_use, overflow="fold", width=16)
    return table


def _refresh_issue(token: RefreshTokenRecord, wide: bool) -> list[str]:
    """Return when a token was issued and when it expires, and in the wide
    table the address it was issued to between them."""
    if not wide:
        return [_when(token.issued_at), _when(token.expires_at)]
    return [
        _when(token.issued_at),
        token.issued_address or "-",
        _when(token.expires_at),
    ]


def _refresh_last_use(token: RefreshTokenRecord, wide: bool) -> list[str]:
    if not wide:
        return [_when(token.last_used_at)]
    return [_when(token.last_used_at), token.last_used_address or "-"]


@refresh_app.command("revoke")
def refresh_revoke(
    customer: CustomerArgument,
    login: LoginArgument,
    token_id: Annotated[
        str | None, typer.Argument(help="Id from `moorage token refresh list`.")
    ] = None,
    all_tokens: Annotated[
        bool, typer.Option("--all", help="Revoke every refresh token of the account.")
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a refresh token; its next use is rejected."""
    if (token_id is None) == (not all_tokens):
        errors.print("[red]error:[/red] give either a token id or --all")
        raise typer.Exit(2)
    target = "every refresh token" if all_tokens else f"refresh token {token_id}"
    count = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.REFRESH_TOKEN_REVOKE,
            f"{target} of {login} ({customer})",
            customer,
            admin.revoke_refresh_tokens(
                s.identity, s.authenticator.refresh_tokens, customer, login, token_id
            ),
        ),
    )
    console.print(f"{count} refresh token(s) of {login} revoked")


# Grants


@grant_app.command("add")
@records_rejections(actions.GRANT_ADD, "grant add")
def grant_add(
    customer: str,
    pattern: Annotated[
        str, typer.Argument(help="Namespace, repository or glob: products/*.")
    ],
    role: Annotated[str, typer.Argument(help="reader, writer, maintainer or owner.")],
    until: Annotated[
        str | None, typer.Option(help="Last moment of access (YYYY-MM-DD, UTC).")
    ] = None,
    account: Annotated[
        str | None, typer.Option(help="Grant to this login only, not the customer.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Grant a pattern whose namespace part has a `*` (such as `*` or "
            "`*/app`), which reaches other customers' namespaces.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Grant a role on a repository pattern to a customer or one of its accounts.

    A pattern with `*` in its first component matches repositories in many
    namespaces, other customers' and future ones included; it needs --force.
    """
    reject_invalid(lambda: admin.validate_pattern(pattern))
    reject_invalid(lambda: admin.check_role(role))
    end = _parse_end_date(until, "--until")
    if not force and _reaches_many_namespaces(pattern):
        reject(
            f"pattern {pattern!r} matches repositories in every namespace that "
            f"matches {pattern.split('/', 1)[0]!r}, other customers' and ones added "
            "later included; name the namespace (products/*), or pass --force to "
            "grant it anyway"
        )
    namespace = pattern.split("/", 1)[0]

    async def add(s: Services) -> tuple[int, str | None]:
        grant_id = await _audited(
            s,
            actions.GRANT_ADD,
            f"{role} on {pattern} to {account or customer}, until {_when(end)}",
            customer,
            admin.add_grant(s.identity, customer, pattern, role, end, account),
        )
        return grant_id, await s.identity.namespace_customer(namespace)

    grant_id, owner = _run(_settings(data_dir=data_dir), add)
    if _reaches_many_namespaces(pattern):
        errors.print(
            f"warning: grant {grant_id} on {pattern!r} reaches every namespace that "
            f"matches {namespace!r}, other customers' included",
            highlight=False,
            soft_wrap=True,
        )
    elif owner not in (None, customer):
        errors.print(
            f"warning: grant {grant_id} on {pattern!r} gives {customer} access to "
            f"the namespace of customer {owner}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"grant {grant_id}: {role} on {pattern} to {account or customer}")


def _reaches_many_namespaces(pattern: str) -> bool:
    return "*" in pattern.split("/", 1)[0]


@grant_app.command("list")
def grant_list(customer: str, data_dir: DataDirOption = None) -> None:
    """List a customer's grants."""

    async def action(services: Services) -> list[tuple[GrantRecord, str]]:
        record = await services.identity.get_customer(customer)
        accounts = {
            account.id: account.login
            for account in await services.identity.list_accounts(record.id)
        }
        grants = await services.identity.list_grants(record.id)
        return [(g, accounts.get(g.account_id or -1, "(customer)")) for g in grants]

    table = Table("id", "pattern", "role", "to", "until")
    for grant, to in _run(_settings(data_dir=data_dir), action):
        table.add_row(str(grant.id), grant.pattern, grant.role, to, _when(grant.until))
    console.print(table)


@grant_app.command("remove")
def grant_remove(customer: str, grant_id: int, data_dir: DataDirOption = None) -> None:
    """Remove a grant; access through it ends on the next request."""
    _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.GRANT_REMOVE,
            f"grant {grant_id} of {customer}",
            customer,
            admin.remove_grant(s.identity, customer, grant_id),
        ),
    )
    console.print(f"grant {grant_id} removed")


# Signing keys


@signing_key_app.command("rotate")
@records_rejections(actions.SIGNING_KEY_ROTATE, "signing-key rotate")
def signing_key_rotate(
    overlap: Annotated[
        int | None,
        typer.Option(
            help="Seconds the old keys keep verifying. Default: the refresh token "
            "lifetime, so no client must log in again. Use 0 for a leaked key."
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a new token signing key; the old ones retire after the overlap."""
    settings = _settings(data_dir=data_dir)
    seconds = settings.refresh_token_ttl_seconds if overlap is None else overlap
    if seconds < 0:
        reject("--overlap must be 0 or more seconds")
    kid = _run(
        settings,
        lambda s: _audited(
            s,
            actions.SIGNING_KEY_ROTATE,
            f"new token signing key; older keys retire in {seconds} s",
            None,
            add_signing_key(s.identity, seconds, s.tokens.codec),
        ),
    )
    console.print(f"new signing key {kid}; older keys retire in {seconds} s")


@signing_key_app.command("list")
def signing_key_list(data_dir: DataDirOption = None) -> None:
    """List the token signing keys (never the private keys)."""
    keys = _run(_settings(data_dir=data_dir), lambda s: s.identity.list_signing_keys())
    table = Table("kid", "algorithm", "created", "retired")
    for key in keys:
        table.add_row(
            key.kid, key.algorithm, _when(key.created_at), _when(key.retired_at)
        )
    console.print(table)
