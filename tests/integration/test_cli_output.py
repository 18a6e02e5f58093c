"""What `moorage` commands print: user-controlled values shown as they are (no
Rich markup, no terminal escapes), and the key-location warning only where it
belongs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.audit.events import AuditEvent
from moorage.config import Settings
from moorage.services import open_services
from tests.support.cli import Cli
from tests.support.database import create_database, drop_database

# Markup that Rich would turn into bold text, and ESC [2J, which clears the screen.
HOSTILE = "[bold]evil[/bold]\x1b[2J"
SHOWN = "[bold]evil[/bold]\\x1b[2J"
# Display names cannot hold control characters, so the customer's has markup only.
NAME = "[bold]evil[/bold]"
KEYS_WARNING = "encryption keys are stored inside the data directory"


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """A data directory with its key files inside, and the customer acme."""
    url = create_database(tmp_path)
    runner = Cli(tmp_path, url)
    runner.ok("customer", "add", "acme", "--name", NAME)
    yield runner
    drop_database(url)


def run_moorage(cli: Cli, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run a command in its own interpreter, so that stderr is what users see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    # Wide enough that no table cell wraps.
    env.update(cli.env, COLUMNS="300")
    return subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_customer_list_shows_name_literally(cli: Cli) -> None:
    result = run_moorage(cli, "customer", "list")
    output = result.stdout
    assert result.returncode == 0, result.stderr
    assert NAME in output


def test_customer_show_shows_name_literally(cli: Cli) -> None:
    output = cli.ok("customer", "show", "acme")
    assert NAME in output


def test_audit_list_shows_reason_literally(cli: Cli) -> None:
    """Text that clients send, stored in audit events, is shown as it is."""

    async def record() -> None:
        services = await open_services(
            Settings(
                data_dir=Path(cli.env["MOORAGE_DATA_DIR"]),
                database_url=cli.env["MOORAGE_DATABASE_URL"],
            )
        )
        try:
            await services.audit.record_now(
                AuditEvent("token.issue", "failure", reason=HOSTILE)
            )
        finally:
            await services.close()

    asyncio.run(record())
    result = run_moorage(cli, "audit", "list", "--action", "token.issue")
    output = result.stdout
    assert result.returncode == 0, result.stderr
    assert SHOWN in output
    assert "\x1b" not in output


def test_error_message_shows_input_literally(cli: Cli) -> None:
    """An invalid name in an error message is not read as markup."""
    result = cli.run("customer", "add", "[bold]x[/bold]")
    assert result.returncode == 2
    assert "'[bold]x[/bold]'" in result.stderr


def test_commands_do_not_warn_about_key_location(cli: Cli) -> None:
    """Only `serve` and `key status` mention keys inside the data directory."""
    result = run_moorage(cli, "customer", "list")
    assert result.returncode == 0, result.stderr
    assert KEYS_WARNING not in result.stderr


def test_key_status_warns_about_key_location(cli: Cli) -> None:
    result = run_moorage(cli, "key", "status")
    assert result.returncode == 0, result.stderr
    assert KEYS_WARNING in result.stderr
    assert result.stderr.count(KEYS_WARNING) == 1
