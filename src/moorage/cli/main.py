"""The `moorage` command line.

Every command reads the same settings as the server (`--data-dir` or
`MOORAGE_DATA_DIR`, the TOML file, `MOORAGE_*` variables) and works on the same
database, so it is safe to use while the server runs.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from moorage import admin
from moorage.config import Settings, load_settings
from moorage.errors import MoorageError
from moorage.logs import configure_logging
from moorage.services import Services, open_services

app = typer.Typer(
    help="Moorage: a container registry for vendors that ship images to customers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
customer_app = typer.Typer(help="Add and list customers.", no_args_is_help=True)
user_app = typer.Typer(help="Manage customer users.", no_args_is_help=True)
app.add_typer(customer_app, name="customer")
config_app = typer.Typer(
    help="Check and document the configuration.", no_args_is_help=True
)
app.add_typer(user_app, name="user")
app.add_typer(config_app, name="config")

console = Console()
errors = Console(stderr=True)
T = TypeVar("T")

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
    except (ValidationError, FileNotFoundError) as error:
        errors.print(f"[red]invalid configuration:[/red] {error}")
        raise typer.Exit(2) from None


def _run(settings: Settings, action: Callable[[Services], Awaitable[T]]) -> T:
    """Open the services, run one action on them, and report domain errors."""

    async def main() -> T:
        services = await open_services(settings)
        try:
            return await action(services)
        finally:
            await services.close()

    configure_logging("warning", settings.log_format)
    try:
        return asyncio.run(main())
    except MoorageError as error:
        errors.print(f"[red]error:[/red] {error.message}")
        raise typer.Exit(1) from None


@app.command()
def serve(
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port to listen on.")] = None,
) -> None:
    """Run the registry. The first start initialises the data directory."""
    from moorage.server import run

    settings = _settings(data_dir=data_dir, host=host, port=port)
    configure_logging(settings.log_level, settings.log_format)
    run(settings, console)


def _parse_date(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        errors.print(f"[red]error:[/red] invalid date {value!r}; use YYYY-MM-DD")
        raise typer.Exit(2) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@customer_app.command("add")
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
    until = _parse_date(access_until)
    customer = _run(
        _settings(data_dir=data_dir),
        lambda s: admin.add_customer(s.identity, slug, name or slug, until),
    )
    console.print(f"customer {customer.slug} added, with namespace {customer.slug}/")


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


@user_app.command("add")
def user_add(
    customer: Annotated[str, typer.Argument(help="Customer the user belongs to.")],
    name: Annotated[str, typer.Argument(help="Login name, unique in the registry.")],
    role: Annotated[
        str, typer.Option(help="reader, writer, maintainer or owner on own namespaces.")
    ] = "reader",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Add a user to a customer. Prints a generated password once."""
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    created = _run(
        _settings(data_dir=data_dir),
        lambda s: admin.add_user(s.identity, customer, name, role, password),
    )
    console.print(f"user {created.login} added to {customer} as {role}")
    if created.password is not None:
        console.print("password (shown once, store it now):")
        print(created.password)


@config_app.command("check")
def config_check(data_dir: DataDirOption = None) -> None:
    """Validate the configuration and print the effective values (secrets hidden)."""
    settings = _settings(data_dir=data_dir)
    for key, value in settings.model_dump().items():
        console.print(f"{key} = {value!r}", highlight=False)


@config_app.command("reference")
def config_reference() -> None:
    """Print every setting as a Markdown table (the source of docs/configuration.md)."""
    from moorage.config import settings_reference

    print(settings_reference())


@app.command("version")
def version() -> None:
    """Print the version."""
    from moorage import __version__

    console.print(__version__)


def main() -> None:
    app()


# Registers the account, robot, token, grant and signing-key commands.
from moorage.cli import identity as _identity  # noqa: E402, F401
