"""The `moorage` command line.

Every command reads the same settings as the server (`--data-dir` or
`MOORAGE_DATA_DIR`, the TOML file, `MOORAGE_*` variables) and works on the same
database, so it is safe to use while the server runs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import select
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import structlog
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from typer.core import TyperGroup

from moorage import admin
from moorage.audit import events as actions
from moorage.audit.recorder import AdminRecorder, local_actor
from moorage.backup.run import reject_unfinished_restore
from moorage.cli.output import Table, shown
from moorage.config import (
    ConfigurationError,
    Settings,
    displayed_settings,
    load_settings,
    too_wide_proxy_warning,
    too_wide_trusted_proxies,
)
from moorage.db.engine import (
    UNREACHABLE_DATABASE_ERRORS,
    unreachable_database_message,
)
from moorage.db.identity_store import (
    AccountRecord,
    CustomerGrant,
    CustomerRecord,
    GrantRecord,
)
from moorage.db.key_store import KeyStore
from moorage.errors import InvalidInputError, MoorageError
from moorage.logs import configure_logging
from moorage.services import Services, open_services
from moorage.storage.encryption import maintenance
from moorage.storage.encryption.custody import DataKeyCustody
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.maintenance import ClaimReport
from moorage.storage.encryption.manifests import (
    ManifestKeyCounts,
    ResealReport,
    count_manifest_keys,
    reseal_manifests,
)
from moorage.storage.paths import BLOBS_PREFIX

# The exit code of a command whose reader closed stdout, as for a process that
# SIGPIPE ended: 128 + 13.
CLOSED_STDOUT_EXIT = 141


def stdout_closed() -> bool:
    """Return whether stdout is a pipe whose reader has closed it (Linux sets
    POLLERR on the write end of a pipe that has no reader)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False  # not a file descriptor, as under a test runner


class _CommandGroup(TyperGroup):
    """The root command: ends a command quietly when its reader closes stdout,
    as `moorage audit export | head` does."""

    def invoke(self, ctx: Any) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            if not stdout_closed():
                raise
            # Output still buffered would fail again at exit: send it nowhere.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            raise typer.Exit(CLOSED_STDOUT_EXIT) from None


app = typer.Typer(
    cls=_CommandGroup,
    help="Moorage: a container registry for vendors that ship images to customers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
customer_app = typer.Typer(
    help="Add, list, suspend, resume, offboard and shred customers.",
    no_args_is_help=True,
)
user_app = typer.Typer(help="Manage customer users.", no_args_is_help=True)
app.add_typer(customer_app, name="customer")
config_app = typer.Typer(
    help="Check and document the configuration.", no_args_is_help=True
)
app.add_typer(user_app, name="user")
app.add_typer(config_app, name="config")
tls_app = typer.Typer(help="Set up TLS certificates.", no_args_is_help=True)
app.add_typer(tls_app, name="tls")
key_app = typer.Typer(
    help="Rotate and inspect the keys that encrypt stored data.", no_args_is_help=True
)
app.add_typer(key_app, name="key")


class _StdoutConsole(Console):
    """A Console for stdout that leaves a closed stdout to `_CommandGroup`,
    where Rich's own handling would exit with code 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


console = _StdoutConsole()
errors = Console(stderr=True)
log = structlog.get_logger(__name__)
T = TypeVar("T")
CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="MOORAGE_DATA_DIR",
        help="Data directory (database, blobs, keys). Default: ./data",
        show_default=False,
    ),
]


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigurationError as error:
        for problem in error.problems:
            errors.print(
                f"[red]invalid configuration:[/red] {shown(problem)}", soft_wrap=True
            )
        raise typer.Exit(2) from None
    except FileNotFoundError as error:
        errors.print(f"[red]invalid configuration:[/red] {shown(error)}")
        raise typer.Exit(2) from None


def _check_data_dir(settings: Settings) -> None:
    """Exit when the data directory is missing or not a directory.

    Only `moorage serve` creates a new installation. Other commands run from the
    wrong working directory would otherwise create an empty one in ./data and
    act on it.
    """
    data_dir = settings.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        errors.print(f"[red]error:[/red] data directory {data_dir} is not a directory")
        raise typer.Exit(2)
    if not data_dir.exists():
        errors.print(
            f"[red]error:[/red] data directory {data_dir.resolve()} does not exist; "
            "pass --data-dir or set MOORAGE_DATA_DIR to the directory of an "
            "installation, or run `moorage serve` to create one"
        )
        raise typer.Exit(2)


def _run(
    settings: Settings,
    action: Callable[[Services], Awaitable[T]],
    *,
    atomic: bool = True,
) -> T:
    """Open the services, run one action on them, and report its errors.

    A domain error or a database error becomes one line on stderr and exit
    code 1; the traceback of a database error is logged at debug level.
    Pass `atomic=False` for an action that commits in several transactions,
    because then a failed run may have changed something.
    """

    async def main() -> T:
        services = await open_services(settings)
        try:
            return await action(services)
        finally:
            await services.close()

    _check_data_dir(settings)
    debug = settings.log_level == "debug"
    configure_logging("debug" if debug else "warning", settings.log_format)
    try:
        return asyncio.run(main())
    except MoorageError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    except SQLAlchemyError as error:
        log.debug("database error", exc_info=error)
        outcome = (
            "nothing was changed"
            if atomic
            else "what was done before it stays; run the command again to finish"
        )
        more = "" if debug else " (MOORAGE_LOG_LEVEL=debug shows the traceback)"
        errors.print(
            f"[red]error:[/red] database error: {_database_reason(error)}; "
            f"{outcome}{more}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    except UNREACHABLE_DATABASE_ERRORS as error:
        if isinstance(error, BrokenPipeError) and stdout_closed():
            raise  # the reader of stdout left (see _CommandGroup)
        _exit_for_connection_error(settings, error)


def _exit_for_connection_error(settings: Settings, error: OSError) -> NoReturn:
    """Print that the database cannot be reached, and exit with code 1.

    The traceback is logged at debug level.
    """
    log.debug("database connection failed", exc_info=error)
    message = unreachable_database_message(settings.resolved_database_url, error)
    errors.print(
        f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(1) from None


def _print_error(error: MoorageError) -> None:
    errors.print(
        f"[red]error:[/red] {shown(error.message)}", highlight=False, soft_wrap=True
    )


def _database_reason(error: SQLAlchemyError) -> str:
    """Return the driver's own message, without the SQL statement and its values."""
    cause: BaseException = error
    if isinstance(error, DBAPIError) and error.orig is not None:
        cause = error.orig
    # The asyncpg adapter wraps the driver's exception; its message is plainer.
    cause = cause.__cause__ or cause
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def _recorder(services: Services) -> AdminRecorder:
    """Record a command's change in the audit trail as the local OS user."""
    return AdminRecorder(services.audit, local_actor())


async def _audited(
    services: Services,
    action: str,
    target: str,
    customer: str | None,
    change: Awaitable[T],
    result: Callable[[T], str] | None = None,
) -> T:
    """Await a command's change and record it (see AdminRecorder.run)."""
    return await _recorder(services).run(action, target, change, customer, result)


async def _audited_outside_transaction(
    services: Services,
    action: str,
    target: str,
    customer: str | None,
    change: Awaitable[T],
) -> T:
    """Await a long change and record it after (see AdminRecorder)."""
    return await _recorder(services).run_outside_transaction(
        action, target, change, customer
    )


@app.command()
def init(data_dir: DataDirOption = None) -> None:
    """Initialise the data directory, database, keys and first vendor admin, and
    exit without serving.

    This is what the first `moorage serve` does before it listens. Run it once
    on the terminal when a service manager will start the server, so that the
    admin's generated password is printed here rather than into the service's
    log. Run again, it migrates the database to this version and creates
    nothing that exists.
    """
    from moorage.server import warn_when_keys_sit_with_data
    from moorage.workers import prepare_installation

    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_level, settings.log_format)
    warn_when_keys_sit_with_data(settings)
    prepare_installation(settings)
    _print_plain(
        f"data directory {settings.data_dir.resolve()} is ready; start the "
        "server with `moorage serve`"
    )


@app.command()
def serve(
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port to listen on.")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate; serve HTTPS.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="PEM private key of --tls-cert.")
    ] = None,
) -> None:
    """Run the registry. The first start initialises the data directory."""
    # A reload asked for while the server starts must not stop it: SIGHUP is
    # ignored from here on (across the exec and in the workers) until the
    # server, or the supervisor of several workers, installs its own handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from moorage import tls
    from moorage.server import (
        run,
        warn_about_wide_trusted_proxies,
        warn_when_keys_sit_with_data,
    )

    settings = _settings(
        data_dir=data_dir, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key
    )
    configure_logging(settings.log_level, settings.log_format)
    try:
        reject_unfinished_restore(settings)
        # Checked before the first start creates the data directory and admin.
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls.server_context(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
            if settings.tls_client_crl and settings.tls_client_ca:
                tls.read_revocations(settings.tls_client_crl, settings.tls_client_ca)
        warn_when_keys_sit_with_data(settings)
        warn_about_wide_trusted_proxies(settings)
        run(settings)
    except MoorageError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    except UNREACHABLE_DATABASE_ERRORS as error:
        # Before it listens, the server opens no connection but the database's.
        # Afterwards, the audit sinks catch their own connection errors.
        _exit_for_connection_error(settings, error)


# The forms `_parse_date` accepts (ISO 8601 as Python's datetime.fromisoformat
# reads it), for error messages.
DATE_FORMS = (
    "a date YYYY-MM-DD or a time YYYY-MM-DDTHH:MM[:SS], UTC unless it ends "
    "with an offset such as +02:00 or Z"
)


class RejectedValueExit(typer.Exit):
    """Exit code 2 for a value that a command rejects after Click parsed it,
    carrying the message for the command's failure event."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def reject(message: str) -> NoReturn:
    """Print `message` as an error and exit with code 2."""
    errors.print(f"[red]error:[/red] {shown(message)}", highlight=False, soft_wrap=True)
    raise RejectedValueExit(message)


def reject_invalid(check: Callable[[], object], prefix: str = "") -> None:
    """Run one of `moorage.admin`'s value checks, and reject the value (exit
    code 2, see `reject`) with the check's message when it is invalid."""
    try:
        check()
    except InvalidInputError as error:
        reject(f"{prefix}{error.message}")


def records_rejections(
    action: str | Callable[[dict[str, Any]], str], command_name: str
) -> Callable[[CommandFunction], CommandFunction]:
    """Make an administrative command record a value it rejects (see `reject`)
    as a failed `action` event, its reason starting with `command_name`,
    before it exits. `action` may be a function of the command's arguments.

    Usage errors that Click reports itself (an unknown option, a missing
    argument, `--help`) never reach the command and are not recorded.
    """

    def decorate(command: CommandFunction) -> CommandFunction:
        @functools.wraps(command)
        def run(**arguments: Any) -> Any:
            try:
                return command(**arguments)
            except RejectedValueExit as rejection:
                name = action if isinstance(action, str) else action(arguments)
                _record_rejection(name, command_name, arguments, rejection.message)
                raise

        return run  # type: ignore[return-value]

    return decorate


def _record_rejection(
    action: str, target: str, arguments: dict[str, Any], reason: str
) -> None:
    """Write the failure event of a rejected command, if the data directory
    and database can be opened; the rejection's own exit code stays."""
    customer = arguments.get("customer", arguments.get("slug"))
    if customer == "-":
        customer = None  # the vendor's own accounts
    try:
        settings = _settings(data_dir=arguments.get("data_dir"))
        if settings.data_dir.is_dir():
            _run(
                settings,
                lambda s: _recorder(s).record_rejection(
                    action, target, customer, reason
                ),
            )
    except typer.Exit:
        pass  # _settings or _run printed why the event was not written


def _parse_date(
    value: str | None, forms: str = DATE_FORMS, kind: str = "date or time"
) -> datetime | None:
    """Parse an ISO 8601 date or time, UTC when it has no offset.

    Exit with a message that names the `kind` of value and lists `forms` when
    the value is invalid.
    """
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as error:
        # fromisoformat names an out-of-range field (such as "hour must be in
        # 0..23"), but reports only "Invalid isoformat string" for other input.
        reason = str(error)
        detail = "" if reason.startswith("Invalid isoformat") else f" ({reason})"
        reject(f"invalid {kind} {value!r}{detail}; use {forms}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_end_date(value: str | None, option: str) -> datetime | None:
    """Parse an end of access like `_parse_date`; reject one in the past."""
    parsed = _parse_date(value)
    if parsed is not None and parsed <= datetime.now(UTC):
        reject(f"{option} {value} is in the past; use a later date")
    return parsed


@customer_app.command("add")
@records_rejections(actions.CUSTOMER_ADD, "customer add")
def customer_add(
    slug: Annotated[
        str, typer.Argument(help="Short name; also the customer's namespace.")
    ],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    access_until: Annotated[
        str | None,
        typer.Option(help="Contract end (YYYY-MM-DD, UTC); access stops then."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Add a customer and its namespace."""
    reject_invalid(lambda: admin.validate_slug(slug))
    until = _parse_end_date(access_until, "--access-until")
    if name is not None:
        reject_invalid(lambda: admin.validate_display_name(name), "--name: ")

    async def add(
        services: Services,
    ) -> tuple[CustomerRecord, ClaimReport, list[CustomerGrant]]:
        customer = await admin.add_customer(
            services.identity, slug, name or slug, until, audit=_recorder(services)
        )
        reaching = await _grants_reaching_new_namespace(services, customer.slug)
        # A push to the namespace racing with this command may have sealed for
        # the vendor; seal what it stored for the customer.
        try:
            claimed = await maintenance.claim_namespace(
                services.registry.driver, services.registry.store, customer.slug
            )
        except SQLAlchemyError as error:
            log.debug("database error", exc_info=error)
            errors.print(
                f"warning: customer {customer.slug} was added, but checking its "
                f"namespace for data sealed for the vendor failed: "
                f"{_database_reason(error)}. `moorage customer shred` repeats "
                "the check before it destroys the customer's key.",
                highlight=False,
                soft_wrap=True,
            )
            claimed = ClaimReport()
        return customer, claimed, reaching

    customer, claimed, reaching = _run(_settings(data_dir=data_dir), add)
    console.print(f"customer {customer.slug} added, with namespace {customer.slug}/")
    if claimed.manifests or claimed.blobs:
        console.print(
            f"{claimed.manifests} manifests and {claimed.blobs} blobs pushed to "
            f"{customer.slug}/ for the vendor were moved to the customer's key"
        )
    for customer_grant in reaching:
        grant = customer_grant.grant
        holder = customer_grant.customer_slug
        grantee = customer_grant.account_login or holder
        errors.print(
            f"warning: grant {grant.id} of {holder} ({grant.role} on "
            f"{grant.pattern}) gives {grantee} access to the new customer's "
            f"namespace {customer.slug}; remove it with `moorage grant remove "
            f"{holder} {grant.id}` unless that is intended",
            highlight=False,
            soft_wrap=True,
        )


async def _grants_reaching_new_namespace(
    services: Services, slug: str
) -> list[CustomerGrant]:
    """Return other customers' grants that reach the new customer's namespace
    `slug`. A database error is printed as a warning, and then none are returned."""
    try:
        return await admin.grants_reaching_namespace(services.identity, slug, slug)
    except SQLAlchemyError as error:
        log.debug("database error", exc_info=error)
        errors.print(
            f"warning: customer {slug} was added, but checking other customers' "
            f"grants on its namespace failed: {_database_reason(error)}. Run "
            "`moorage grant list CUSTOMER` to look for grants on "
            f"{slug}/ or a glob that matches it.",
            highlight=False,
            soft_wrap=True,
        )
        return []


@customer_app.command("list")
def customer_list(data_dir: DataDirOption = None) -> None:
    """List customers."""
    customers = _run(
        _settings(data_dir=data_dir), lambda s: s.identity.list_customers()
    )
    table = Table("customer", "name", "status", "access until", "created")
    for customer in customers:
        table.add_row(
            customer.slug,
            customer.display_name,
            customer.status,
            customer.access_until.date().isoformat() if customer.access_until else "-",
            customer.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@customer_app.command("show")
def customer_show(customer: str, data_dir: DataDirOption = None) -> None:
    """Show a customer: status, contract end, namespaces, accounts and grants."""

    async def load(
        services: Services,
    ) -> tuple[
        CustomerRecord,
        list[str],
        list[AccountRecord],
        list[GrantRecord],
        datetime | None,
    ]:
        record = await services.identity.get_customer(customer)
        return (
            record,
            await services.identity.namespaces_of(record.id),
            await services.identity.list_accounts(record.id),
            await services.identity.list_grants(record.id),
            await services.identity.delete_after(record.id),
        )

    record, namespaces, accounts, grants, delete_after = _run(
        _settings(data_dir=data_dir), load
    )
    until = record.access_until.date().isoformat() if record.access_until else "-"
    users = [account for account in accounts if account.kind == "user"]
    disabled = sum(1 for account in accounts if account.disabled)
    console.print(f"customer      {record.slug} ({shown(record.display_name)})")
    console.print(f"status        {record.status}")
    console.print(f"access until  {until}")
    if delete_after is not None:
        console.print(
            f"deletion      repositories deleted after "
            f"{delete_after:%Y-%m-%d %H:%M} UTC (customer offboard "
            "--delete-after; customer resume cancels it)",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"created       {record.created_at.strftime('%Y-%m-%d %H:%M')}")
    console.print(f"namespaces    {', '.join(namespaces) or '-'}")
    console.print(
        f"accounts      {len(users)} users, {len(accounts) - len(users)} robots, "
        f"{disabled} disabled"
    )
    console.print(f"grants        {len(grants)} (moorage grant list {record.slug})")


@user_app.command("add")
@records_rejections(
    lambda arguments: (
        actions.VENDOR_USER_ADD if arguments["customer"] == "-" else actions.USER_ADD
    ),
    "user add",
)
def user_add(
    customer: Annotated[
        str,
        typer.Argument(
            help="Customer the user belongs to, or '-' for a vendor account."
        ),
    ],
    name: Annotated[str, typer.Argument(help="Login name, unique in the registry.")],
    role: Annotated[
        str,
        typer.Option(
            help="reader, writer, maintainer or owner on the customer's own "
            "namespaces; admin or auditor for a vendor account."
        ),
    ] = "reader",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Add a user to a customer, or a vendor account. Prints a generated password
    once."""
    reject_invalid(lambda: admin.validate_login(name))
    if customer == "-":
        reject_invalid(lambda: admin.check_vendor_role(role))
    else:
        reject_invalid(lambda: admin.check_role(role))
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    if customer == "-":
        created = _run(
            _settings(data_dir=data_dir),
            lambda s: admin.add_vendor_user(
                s.identity, name, role, password, audit=_recorder(s)
            ),
        )
        console.print(f"vendor user {created.login} added as {role}")
    else:
        created = _run(
            _settings(data_dir=data_dir),
            lambda s: admin.add_user(
                s.identity, customer, name, role, password, audit=_recorder(s)
            ),
        )
        console.print(f"user {created.login} added to {customer} as {role}")
    if created.password is not None:
        console.print("password (shown once, store it now):")
        print(created.password)


@config_app.command("check")
def config_check(data_dir: DataDirOption = None) -> None:
    """Validate the configuration and print the effective values (secrets hidden)."""
    settings = _settings(data_dir=data_dir)
    for key, value in displayed_settings(settings).items():
        console.print(f"{key} = {shown(value)}", highlight=False, soft_wrap=True)
    if not settings.audit_request_events:
        errors.print(_REQUEST_EVENTS_OFF, highlight=False)
    for entry in too_wide_trusted_proxies(settings.trusted_proxies):
        errors.print(
            f"warning: {too_wide_proxy_warning(entry)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


_REQUEST_EVENTS_OFF = (
    "warning: audit_request_events is false, a setting for measurements only: "
    "pulls, pushes and logins are not recorded in the audit trail. Remove it or "
    "set it to true."
)


@config_app.command("reference")
def config_reference() -> None:
    """Print every setting as a Markdown table (the source of docs/configuration.md)."""
    from moorage.config import settings_reference

    print(settings_reference())


@tls_app.command("init")
def tls_init(
    hostname: Annotated[
        str,
        typer.Option(
            help="DNS name or IP address clients use for the registry; an "
            "internationalised name is written in its xn-- (IDNA) form."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory for the files.")] = Path("tls"),
    port: Annotated[int, typer.Option(help="Port, for the instructions.")] = 5000,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace existing files in --out. Clients that trust the old CA, "
            "and client certificates it signed, stop working.",
        ),
    ] = False,
) -> None:
    """Create a private CA and a server certificate for a quick start.

    Exits with an error instead of overwriting existing files, unless --force.
    """
    from moorage import tls

    try:
        name = tls.server_name(hostname)
        created = tls.init_private_ca(name, out, force=force)
    except MoorageError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    if name != hostname:
        _print_plain(f"{hostname} is written as {name} in the certificate.\n")
    _print_plain(
        f"created {created.ca_cert} (the CA clients trust), {created.server_cert} and "
        f"{created.server_key}.\nKeep {created.ca_key} offline; it signs "
        "certificates.\n\nServe with:\n"
        f"  moorage serve --tls-cert {created.server_cert} "
        f"--tls-key {created.server_key}\n"
    )
    _print_plain(tls.trust_instructions(name, port, created.ca_cert.resolve()))


def _print_plain(text: str) -> None:
    """Print text as it is: no markup, no highlighting, and no wrapping at the
    terminal width, so that commands in it can be copied whole."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


KEYS_WITH_DATA = (
    "encryption keys are stored inside the data directory, so a copy of that "
    "directory can be decrypted; set encryption_key_dir to another disk, or use "
    "the env or pkcs11 key source"
)


def _encrypted_driver(services: Services) -> EncryptedDriver:
    driver = services.registry.driver
    if not isinstance(driver, EncryptedDriver):
        raise MoorageError(
            "encryption at rest is not configured; set encryption = true first"
        )
    return driver


@tls_app.command("client-cert")
def tls_client_cert(
    login: Annotated[str, typer.Argument(help="Account login; the certificate's CN.")],
    ca_dir: Annotated[
        Path, typer.Option(help="Directory with ca.crt and ca.key from tls init.")
    ] = Path("tls"),
    out: Annotated[Path, typer.Option(help="Directory for the files.")] = Path("."),
    skip_account_check: Annotated[
        bool,
        typer.Option(
            "--skip-account-check",
            help="Do not open the database to check that the account exists, for "
            "a CA kept on a machine without access to the installation. The "
            "login's syntax is still checked.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Issue a client certificate for mutual TLS, signed by the private CA.

    Rejects a login that no account of the installation has (see
    --skip-account-check), because such a certificate would log in as whoever
    gets that login later.
    """
    from moorage import tls

    try:
        _check_login_syntax(login)
    except MoorageError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    if not skip_account_check:
        settings = _settings(data_dir=data_dir)
        if not settings.data_dir.is_dir():
            errors.print(
                f"[red]error:[/red] data directory {settings.data_dir.resolve()} "
                f"does not exist, so account {login} cannot be checked; pass "
                "--data-dir or set MOORAGE_DATA_DIR, or pass --skip-account-check",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2)
        _run(settings, lambda services: _require_account(services, login))
    try:
        cert = tls.issue_client_certificate(ca_dir, login, out)
    except MoorageError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    _print_plain(
        f"created {cert} and {cert.with_suffix('.key')}. Put both, with the "
        "server's ca.crt, in the client's certificates directory "
        "(/etc/containers/certs.d/HOST:PORT/ or --cert-dir)."
    )


@tls_app.command("revoke-client")
def tls_revoke_client(
    certificates: Annotated[
        list[Path] | None,
        typer.Argument(help="Client certificate files (.cert) to revoke."),
    ] = None,
    serial: Annotated[
        list[str] | None,
        typer.Option(
            help="Serial number to revoke, in hex as `openssl x509 -serial` prints "
            "it, for a certificate whose file is gone (repeatable).",
        ),
    ] = None,
    ca_dir: Annotated[
        Path, typer.Option(help="Directory with ca.crt and ca.key from tls init.")
    ] = Path("tls"),
    crl: Annotated[
        Path,
        typer.Option(
            help="Revocation list file to add to (created if missing); the file "
            "that tls_client_crl names."
        ),
    ] = Path("tls/client.crl"),
) -> None:
    """Revoke client certificates: add them to the CA's revocation list.

    Servers whose tls_client_crl names the list read it again within
    tls_reload_seconds or on SIGHUP. From then on, a request with a revoked
    certificate fails to log in. Tokens it got before stay valid until they
    expire (token_ttl_seconds).
    """
    from moorage import tls

    serials: list[int] = []
    for text in serial or []:
        try:
            serials.append(int(text.replace(":", ""), 16))
        except ValueError:
            reject(f"--serial {text!r} is not a hexadecimal serial number")
    if not certificates and not serials:
        reject("give the certificate files to revoke, or --serial")
    try:
        serials += [tls.certificate_serial(path) for path in certificates or []]
        count = tls.revoke_client_certificates(ca_dir, crl, serials)
    except MoorageError as error:
        _print_error(error)
        raise typer.Exit(1) from None
    revoked = ", ".join(f"{number:X}" for number in serials)
    _print_plain(
        f"revoked serial {revoked}; {crl} now lists {count} certificate(s). Servers "
        "with tls_client_crl set to it load it within tls_reload_seconds; tokens "
        "issued before stay valid until they expire."
    )


def _check_login_syntax(login: str) -> None:
    """Raise InvalidInputError unless `login` is a valid user or robot login."""
    customer, separator, robot = login.partition("+")
    if separator:
        admin.robot_login(admin.validate_slug(customer), robot)
    else:
        admin.validate_login(login)


async def _require_account(services: Services, login: str) -> None:
    if await services.identity.find_account(login) is None:
        raise MoorageError(
            f"no account has the login {login!r}; add the user or robot first, or "
            "pass --skip-account-check to issue the certificate anyway"
        )


@key_app.command("status")
def key_status(data_dir: DataDirOption = None) -> None:
    """List key-encryption keys and the keys each one wraps, and count the data
    keys of blobs and manifests under each owner key."""
    from moorage.storage.encryption.setup import keys_inside_data_dir

    settings = _settings(data_dir=data_dir)
    if keys_inside_data_dir(settings):
        errors.print(f"warning: {KEYS_WITH_DATA}", highlight=False, soft_wrap=True)

    async def action(services: Services) -> None:
        driver = _encrypted_driver(services)
        usage = await maintenance.key_usage(driver, KeyStore(services.engine))
        active = driver.keyring.active().key_id
        # Key ids are copied into commands, so they are never cut short.
        table = Table(
            Column("key-encryption key", no_wrap=True),
            "active",
            "owner keys",
            "database keys",
            "blob envelopes",
        )
        for key_id in sorted(set(driver.keyring.key_ids()) | usage.key_ids()):
            table.add_row(
                key_id,
                "yes" if key_id == active else "",
                str(usage.owner_keys[key_id]),
                str(usage.database_keys[key_id]),
                str(usage.envelopes[key_id]),
            )
        console.print(f"keys from {shown(driver.keyring.describe())}")
        console.print(table)
        if driver.custody is not None:
            await _print_owner_key_usage(services, driver.custody)

    _run(settings, action)


async def _print_owner_key_usage(services: Services, custody: DataKeyCustody) -> None:
    """Print the blob and manifest data keys that each owner key wraps, and the
    manifests that no owner key seals."""
    blobs = await custody.wraps.count_by_owner()
    manifests = await count_manifest_keys(services.registry.store)
    owners = set(blobs) | {owner for owner, _ in manifests.owner_keys}

    table = Table("owner key-encryption key", "blob data keys", "manifest data keys")
    destroyed = 0
    for owner in sorted(owners):
        key = await custody.owner_keys.reload(owner)
        current = 0
        for (name, key_id), count in manifests.owner_keys.items():
            if name != owner:
                continue
            if key is not None and key_id == key.fingerprint:
                current += count
            else:
                destroyed += count
        if key is not None or blobs[owner]:
            table.add_row(owner, str(blobs[owner]), str(current))
    console.print(table)

    _print_unsealed_manifests(destroyed, manifests)


def _print_unsealed_manifests(destroyed: int, manifests: ManifestKeyCounts) -> None:
    """Print the counts of manifests that no current owner key seals."""
    if destroyed:
        console.print(
            f"{destroyed} manifests are sealed under destroyed owner keys "
            "(customer shred); nothing can read them"
        )
    if manifests.database_key:
        console.print(
            f"{manifests.database_key} manifests are sealed with the database data "
            "key, not yet for their owners; the server seals them for their owners "
            "in the background"
        )
    if manifests.plaintext:
        console.print(
            f"{manifests.plaintext} manifests are stored in plaintext; the server "
            "encrypts them in the background while encryption is on"
        )


@key_app.command("rotate")
def key_rotate(
    keep_old: Annotated[
        bool, typer.Option(help="Keep the old keys instead of retiring them.")
    ] = False,
    keep_active: Annotated[
        bool,
        typer.Option(
            help="Create no new key; rewrap to the active one (env key source)."
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Add a new key-encryption key and rewrap every data key with it, online."""

    async def rotate(services: Services) -> maintenance.RewrapReport:
        driver = _encrypted_driver(services)
        with _progress("rewrapping data keys") as update:
            return await maintenance.rotate(
                driver,
                KeyStore(services.engine),
                new_key=not keep_active,
                retire=not keep_old,
                progress=update,
            )

    async def action(services: Services) -> tuple[maintenance.RewrapReport, str]:
        report = await _audited_outside_transaction(
            services, actions.KEY_ROTATE, "key-encryption key", None, rotate(services)
        )
        return report, _encrypted_driver(services).keyring.active().key_id

    report, active = _run(_settings(data_dir=data_dir), action, atomic=False)
    console.print(_describe_rewrap(report, active), highlight=False, soft_wrap=True)
    _print_retirement(report)


def _print_retirement(report: maintenance.RewrapReport) -> None:
    """Tell the operator which earlier keys to remove by hand, and exit with
    code 1 when some of them still wrap keys."""
    if report.unused:
        console.print(
            f"key-encryption key {', '.join(report.unused)} wraps nothing now: "
            f"remove it from {report.remove_from} and restart the server",
            highlight=False,
            soft_wrap=True,
        )
    if report.still_used:
        counts = ", ".join(
            f"{key_id} ({count} keys)" for key_id, count in report.still_used.items()
        )
        errors.print(
            f"[red]error:[/red] key-encryption key {counts} still wraps keys "
            "written after the rewrap by a server that does not have the new "
            f"active key yet; keep it in {report.remove_from}, restart every "
            "server with the new key, and run `moorage key rotate --keep-active` "
            "again",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _describe_rewrap(report: maintenance.RewrapReport, active: str) -> str:
    """Describe what `key rotate` rewrapped, by kind of key."""
    current = (
        f"; {report.already_current} blob envelopes were under it already"
        if report.already_current
        else ""
    )
    if not report.rewrapped:
        return (
            f"no keys to rewrap: every key is under the active key-encryption "
            f"key {active}{current}"
        )
    return (
        f"rewrapped {report.rewrapped} keys under key-encryption key {active}: "
        f"{report.sealed_keys} owner and database keys, {report.envelopes} blob "
        f"envelopes{current}"
    )


@key_app.command("reencrypt")
def key_reencrypt(
    restart: Annotated[
        bool, typer.Option(help="Start from the beginning, not where it stopped.")
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Encrypt every blob and manifest again with new data keys. Resumes an
    interrupted run of the blobs."""

    # The step running when Ctrl-C interrupts, for the message.
    step = "blobs"

    async def reencrypt(
        services: Services,
    ) -> tuple[maintenance.ReencryptReport, ResealReport]:
        nonlocal step
        driver = _encrypted_driver(services)
        with _progress("re-encrypting blobs") as update:
            blobs = await maintenance.reencrypt_all(
                driver, BLOBS_PREFIX, update, restart=restart
            )
        step = "manifests"
        return blobs, await reseal_manifests(services.registry.store, renew=True)

    async def action(
        services: Services,
    ) -> tuple[maintenance.ReencryptReport, ResealReport]:
        return await _audited_outside_transaction(
            services,
            actions.KEY_REENCRYPT,
            "blobs and manifests",
            None,
            reencrypt(services),
        )

    try:
        report, manifests = _run(_settings(data_dir=data_dir), action, atomic=False)
    except KeyboardInterrupt:
        _exit_reencrypt_interrupted(step)
    console.print(f"{report.reencrypted} blobs re-encrypted")
    if report.shredded:
        console.print(
            f"{report.shredded} blobs skipped: their data keys were destroyed "
            "by shredding, so nothing can read them"
        )
    console.print(f"{manifests.resealed} manifests re-encrypted")
    if manifests.shredded:
        console.print(
            f"{manifests.shredded} manifests skipped: their owners' keys were "
            "destroyed by shredding, so nothing can read them"
        )
    if manifests.damaged:
        console.print(
            f"{manifests.damaged} manifests skipped: they failed their integrity "
            "check; see the server log and `moorage audit list`"
        )


def _exit_reencrypt_interrupted(step: str) -> NoReturn:
    """Say what an interrupted `key reencrypt` leaves, and exit with code 130
    (128 + SIGINT), as shells report a command that Ctrl-C stopped."""
    if step == "blobs":
        resume = (
            "the blobs re-encrypted so far keep their new data keys; run "
            "`moorage key reencrypt` again to continue from the blob where it "
            "stopped"
        )
    else:
        resume = (
            "every blob was re-encrypted, and so were some manifests; run "
            "`moorage key reencrypt` again to re-encrypt everything once more"
        )
    errors.print(
        f"[red]error:[/red] key reencrypt interrupted; {resume}",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(130)


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar, and the callback that moves it.

    The bar appears at the first update with a total above zero, so work that
    finds nothing to do shows no empty "0/0" bar.
    """
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=errors,
    )
    task: TaskID | None = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            if total <= 0:
                return
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


@app.command("version")
def version() -> None:
    """Print the version."""
    from moorage import __version__

    console.print(__version__)


# The audit and usage commands use the helpers above, so they come last.
from moorage.cli.audit import audit_app, usage_app  # noqa: E402

app.add_typer(audit_app, name="audit")
app.add_typer(usage_app, name="usage")


def main() -> None:
    app()


# Registers the backup commands.
from moorage.cli import backup as _backup  # noqa: E402, F401

# Registers `gc`.
from moorage.cli import gc as _gc  # noqa: E402, F401

# Registers the account, robot, token, grant and signing-key commands.
from moorage.cli import identity as _identity  # noqa: E402, F401

# Registers the failed-login commands.
from moorage.cli import logins as _logins  # noqa: E402, F401

# Registers `customer offboard`.
from moorage.cli import offboard as _offboard  # noqa: E402, F401
