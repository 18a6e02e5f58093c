"""Every command that changes something records an audit event."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from moorage.audit.events import StoredEvent
from moorage.cli.main import app
from moorage.config import Settings
from moorage.db.audit_store import AuditFilter
from moorage.services import open_services
from tests.support.database import create_database, drop_database

# Each command that changes state, the arguments to run it with, and the action
# it must record.
CHANGING = {
    # Creates the first vendor admin in the empty database.
    "init": (["init"], "vendor_user.add"),
    "customer add": (["customer", "add", "acme", "--name", "Acme"], "customer.add"),
    "user add": (["user", "add", "acme", "alice", "--role", "writer"], "user.add"),
    "user role": (["user", "role", "acme", "alice", "maintainer"], "user.role"),
    "user disable": (["user", "disable", "acme", "alice"], "user.disable"),
    "user enable": (["user", "enable", "acme", "alice"], "user.enable"),
    "user reset-password": (
        ["user", "reset-password", "acme", "alice"],
        "user.password_reset",
    ),
    "robot add": (["robot", "add", "acme", "ci"], "robot.add"),
    "robot rotate": (["robot", "rotate", "acme", "ci"], "robot.rotate"),
    "robot role": (["robot", "role", "acme", "ci", "writer"], "robot.role"),
    "robot disable": (["robot", "disable", "acme", "ci"], "robot.disable"),
    "robot enable": (["robot", "enable", "acme", "ci"], "robot.enable"),
    "robot remove": (["robot", "remove", "acme", "ci"], "robot.remove"),
    "token add": (
        ["token", "add", "acme", "alice", "--name", "ci"],
        "personal_token.add",
    ),
    "token revoke": (
        ["token", "revoke", "acme", "alice", "1"],
        "personal_token.revoke",
    ),
    "token refresh revoke": (
        ["token", "refresh", "revoke", "acme", "alice", "--all"],
        "refresh_token.revoke",
    ),
    "login unlock": (["login", "unlock", "alice"], "login.unlock"),
    "user remove": (["user", "remove", "acme", "alice"], "user.remove"),
    "grant add": (["grant", "add", "acme", "products/*", "reader"], "grant.add"),
    "grant remove": (["grant", "remove", "acme", "1"], "grant.remove"),
    "customer suspend": (["customer", "suspend", "acme"], "customer.suspend"),
    # Runs while acme is suspended, as shredding requires.
    "customer shred": (["customer", "shred", "acme", "--confirm"], "customer.shred"),
    "customer resume": (["customer", "resume", "acme"], "customer.resume"),
    "signing-key rotate": (
        ["signing-key", "rotate", "--overlap", "0"],
        "signing_key.rotate",
    ),
    "audit archive": (["audit", "archive", "--older-than-days", "0"], "audit.archive"),
    "key rotate": (["key", "rotate"], "key.rotate"),
    "key reencrypt": (["key", "reencrypt"], "key.reencrypt"),
    # {tmp} is the directory that holds the data directory.
    "backup create": (["backup", "create", "{tmp}/backups"], "backup.create"),
    "gc": (["gc"], "gc.run"),
}
# Commands that only read (serve is covered by the request tests).
READ_ONLY = {
    "serve",
    "version",
    "customer list",
    "customer show",
    "user list",
    "robot list",
    "token list",
    "token refresh list",
    "login list",
    "grant list",
    "signing-key list",
    "config check",
    "config reference",
    "audit list",
    "audit verify",
    "audit export",
    "usage report",
    "key status",
    # These write certificate and revocation list files only; the registry's
    # state is unchanged (servers log when they load a new revocation list).
    "tls init",
    "tls client-cert",
    "tls revoke-client",
    # These read or change only a backup directory.
    "backup list",
    "backup verify",
    "backup prune",
}


# Commands that change state only where there are images, so that they cannot
# run in the sequence above; the named test checks their events.
CHECKED_ELSEWHERE = {
    "customer offboard": "tests/e2e/test_offboarding.py",
    # Needs an empty installation; records its event in the restored one.
    "backup restore": "tests/e2e/test_backup.py",
}


def _command_names(command: Any, prefix: str = "") -> set[str]:
    if getattr(command, "commands", None):
        names: set[str] = set()
        for name, child in command.commands.items():
            names |= _command_names(child, f"{prefix} {name}".strip())
        return names
    return {prefix}


def test_every_command_is_classified() -> None:
    """Each CLI command is listed as changing (with its action) or read-only."""
    names = _command_names(typer.main.get_command(app))
    assert names == set(CHANGING) | READ_ONLY | set(CHECKED_ELSEWHERE)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    return directory


def test_changing_commands_record_events(data_dir: Path) -> None:
    """Running each changing command adds its action to the audit trail."""
    url = create_database(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(MOORAGE_DATA_DIR=str(data_dir), MOORAGE_DATABASE_URL=url)
    newest: dict[str, StoredEvent] = {}
    try:
        for name, (arguments, action) in CHANGING.items():
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "moorage",
                    *(a.replace("{tmp}", str(data_dir.parent)) for a in arguments),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            assert completed.returncode == 0, f"{name}: {completed.stderr}"
            newest[name] = _events(data_dir, url)[-1]
            assert newest[name].event.action == action, name
        user_add = newest["user add"].event
        assert user_add.actor_account is not None
        assert user_add.actor_account.startswith("os:")
        assert user_add.reason == "user alice of acme as writer"
    finally:
        drop_database(url)


def _events(data_dir: Path, url: str) -> list[StoredEvent]:
    async def read() -> list[StoredEvent]:
        services = await open_services(Settings(data_dir=data_dir, database_url=url))
        try:
            return await services.audit.query(AuditFilter(), 1000)
        finally:
            await services.close()

    return asyncio.run(read())
