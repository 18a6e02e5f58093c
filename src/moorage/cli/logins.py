"""Commands that show and clear the failed-login throttle's counters.

`moorage.cli.main` imports this module at its end; the commands register
themselves on its Typer app.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Column

from moorage import admin
from moorage.audit import events as actions
from moorage.cli.main import DataDirOption, _audited, _run, _settings, app, console
from moorage.cli.main import errors as error_console
from moorage.cli.output import Table
from moorage.db.login_failure_store import CounterRecord
from moorage.services import Services

login_app = typer.Typer(
    help="Show and clear the counters of failed logins.", no_args_is_help=True
)
app.add_typer(login_app, name="login")


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


@login_app.command("list")
def login_list(data_dir: DataDirOption = None) -> None:
    """List the failed-login counters still counted, with any wait they impose."""

    async def action(services: Services) -> list[CounterRecord]:
        throttle = services.authenticator.throttle
        since = time.time() - throttle.policy.forget_after
        return await throttle.store.list_counters(since)

    now = time.time()
    # Login names and addresses are what `unlock` takes, so they are never wrapped.
    table = Table(
        "counter",
        Column("login", no_wrap=True),
        Column("address", no_wrap=True),
        "failures",
        "last failure",
        "wait",
    )
    for record in _run(_settings(data_dir=data_dir), action):
        wait = max(record.counter.blocked_until - now, 0)
        table.add_row(
            record.key.scope,
            record.key.login or "-",
            record.key.address or "-",
            str(record.counter.failures),
            _time(record.counter.last_failure),
            f"{wait:.0f} s" if wait else "-",
        )
    console.print(table)


@login_app.command("unlock")
def login_unlock(
    login: Annotated[
        str | None, typer.Argument(help="Login name whose counters to clear.")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Client address whose counters to clear."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Clear failed-login counters, which ends their waits at once.

    With a login name, its counters from every address; with --address, that
    address's counters for every name; with both, only that pair.
    """
    if login is None and address is None:
        error_console.print("[red]error:[/red] give a login name, --address or both")
        raise typer.Exit(2)
    target = " from ".join(part for part in (login, address) if part is not None)
    count = _run(
        _settings(data_dir=data_dir),
        lambda s: _audited(
            s,
            actions.LOGIN_UNLOCK,
            f"failed-login counters of {target}",
            None,
            admin.unlock_login(s.authenticator.throttle.store, login, address),
        ),
    )
    console.print(f"{count} failed-login counter(s) of {target} cleared")
