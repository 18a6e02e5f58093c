"""Administrative changes and their audit events commit together or not at all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from moorage import admin
from moorage.audit.events import FAILURE, AuditEvent, StoredEvent
from moorage.audit.recorder import Actor, AdminRecorder
from moorage.config import Settings
from moorage.db.audit_store import AuditFilter
from moorage.db.engine import create_engine
from moorage.db.schema import (
    accounts,
    customers,
    data_key_wraps,
    grants,
    namespaces,
    personal_tokens,
    sealed_keys,
    signing_keys,
)
from moorage.errors import ConflictError, NotFoundError
from moorage.services import Services, open_services
from tests.support.audit import (
    REJECTED,
    audit_events,
    execute_sql,
    reject_audit_events,
    rejecting_statements,
)
from tests.support.database import create_database, drop_database
from tests.support.oci_client import pull_image, push_image, small_image
from tests.support.server import ServerProcess

# Tables that administrative commands change, compared row by row.
ADMIN_TABLES = (
    customers,
    namespaces,
    accounts,
    grants,
    personal_tokens,
    signing_keys,
    sealed_keys,
    data_key_wraps,
)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = create_database(data_dir)
    yield Settings(data_dir=data_dir, database_url=url)
    drop_database(url)


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    opened = await open_services(settings)
    yield opened
    await opened.close()


def _cli(settings: Settings, *arguments: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(
        MOORAGE_DATA_DIR=str(settings.data_dir),
        MOORAGE_DATABASE_URL=settings.resolved_database_url,
    )
    return subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


async def _snapshot_async(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            tables = {
                table.name: [
                    tuple(row)
                    for row in await connection.execute(
                        select(table).order_by(*table.primary_key.columns)
                    )
                ]
                for table in ADMIN_TABLES
            }
            events = await connection.execute(
                text("SELECT seq, action, outcome FROM audit_events ORDER BY seq")
            )
            tables["audit_events"] = [tuple(row) for row in events]
    finally:
        await engine.dispose()
    return tables


def _snapshot(settings: Settings) -> dict[str, Any]:
    """Return every row of the administrative tables and the audit events."""
    return asyncio.run(_snapshot_async(settings.resolved_database_url))


async def _create_owner_key(settings: Settings, owner: str) -> None:
    """Create an owner's key-encryption key, as the first push for it would."""
    services = await open_services(settings)
    try:
        custody = services.registry.driver.custody  # type: ignore[attr-defined]
        await custody.owner_keys.current(owner)
    finally:
        await services.close()


# Each command, and the action whose audit write the database rejects.
REJECTED_COMMANDS = {
    "customer add": (["customer", "add", "globex"], "customer.add"),
    "user add": (["user", "add", "acme", "bob"], "user.add"),
    "user disable": (["user", "disable", "acme", "alice"], "user.disable"),
    "robot add": (["robot", "add", "acme", "deploy"], "robot.add"),
    "robot rotate": (["robot", "rotate", "acme", "ci"], "robot.rotate"),
    "robot remove": (["robot", "remove", "acme", "ci"], "robot.remove"),
    "token add": (
        ["token", "add", "acme", "alice", "--name", "laptop"],
        "personal_token.add",
    ),
    "grant add": (["grant", "add", "acme", "products/*", "reader"], "grant.add"),
    "customer suspend": (["customer", "suspend", "acme"], "customer.suspend"),
    "signing-key rotate": (
        ["signing-key", "rotate", "--overlap", "0"],
        "signing_key.rotate",
    ),
}


def test_rejected_audit_write_keeps_no_change(settings: Settings) -> None:
    """When the database rejects a command's audit event, the command changes nothing.

    A trigger rejects the event's insert; the command must fail and every
    administrative table must hold the rows it held before.
    """
    for arguments in (
        ["customer", "add", "acme"],
        ["user", "add", "acme", "alice"],
        ["robot", "add", "acme", "ci"],
    ):
        prepared = _cli(settings, *arguments)
        assert prepared.returncode == 0, prepared.stderr

    for name, (arguments, action) in REJECTED_COMMANDS.items():
        reject_audit_events(settings.resolved_database_url, action)
        before = _snapshot(settings)
        completed = _cli(settings, *arguments)
        after = _snapshot(settings)
        assert completed.returncode != 0, name
        assert REJECTED in completed.stderr, f"{name}: {completed.stderr}"
        assert after == before, name

    # Shredding needs a suspended customer with a key-encryption key.
    reject_audit_events(settings.resolved_database_url, "none")
    asyncio.run(_create_owner_key(settings, "customer:acme"))
    suspended = _cli(settings, "customer", "suspend", "acme")
    assert suspended.returncode == 0, suspended.stderr
    reject_audit_events(settings.resolved_database_url, "customer.shred")
    before = _snapshot(settings)
    assert "customer:acme" in [row[0] for row in before["sealed_keys"]]
    shredded = _cli(settings, "customer", "shred", "acme", "--confirm")
    assert shredded.returncode != 0
    assert REJECTED in shredded.stderr, shredded.stderr
    assert _snapshot(settings) == before

    reject_audit_events(settings.resolved_database_url, "none")
    verified = _cli(settings, "audit", "verify")
    assert verified.returncode == 0, verified.stderr


async def test_rejected_audit_write_reaches_no_observer(
    settings: Settings, services: Services
) -> None:
    """Observers and the metrics see no event of a change that was rolled back."""
    observed: list[AuditEvent] = []
    services.audit.observers.append(observed.append)
    recorder = AdminRecorder(services.audit, Actor("os:test"))
    await execute_sql(settings.resolved_database_url, rejecting_statements("grant.add"))
    await admin.add_customer(services.identity, "acme", "Acme", None, audit=recorder)
    written = services.audit.written

    with pytest.raises(Exception, match=REJECTED):
        await recorder.run(
            "grant.add",
            "grant products/* to acme",
            admin.add_grant(services.identity, "acme", "products/*", "reader", None),
            "acme",
        )

    customer = await services.identity.get_customer("acme")
    assert await services.identity.list_grants(customer.id) == []
    assert [event.action for event in observed] == ["customer.add"]
    assert services.audit.written == written


async def _events(services: Services, action: str) -> list[StoredEvent]:
    return await services.audit.query(AuditFilter(action=action), 100_000)


async def test_failed_change_keeps_failure_event(services: Services) -> None:
    """A change that fails after some writes leaves its failure event and no write."""
    recorder = AdminRecorder(services.audit, Actor("os:test"))
    await admin.add_vendor_user(services.identity, "taken", "auditor")

    async def create_then_conflict() -> None:
        # The customer and its namespace are written, then the account insert
        # fails on the unique login and raises ConflictError.
        customer = await services.identity.create_customer("acme", "Acme", None)
        await services.identity.add_grant(
            customer.id, None, "products/*", "reader", None
        )
        await services.identity.create_account(
            login="taken",
            customer_id=customer.id,
            kind="user",
            role="reader",
            secret_hash="not-a-hash",
        )

    with pytest.raises(ConflictError):
        await recorder.run(
            "customer.add", "customer acme", create_then_conflict(), "acme"
        )

    with pytest.raises(NotFoundError):
        await services.identity.get_customer("acme")
    failures = await _events(services, "customer.add")
    assert [stored.event.outcome for stored in failures] == [FAILURE]
    assert failures[0].event.reason is not None
    assert "already taken" in failures[0].event.reason
    assert (await services.audit.verify()).ok


async def test_cli_failure_event_after_rollback(settings: Settings) -> None:
    """A command that fails on a real constraint records its failure event."""
    first = _cli(settings, "customer", "add", "acme")
    again = _cli(settings, "customer", "add", "acme")

    assert first.returncode == 0, first.stderr
    assert again.returncode == 1
    services = await open_services(settings)
    try:
        events = await _events(services, "customer.add")
        assert [stored.event.outcome for stored in events] == ["success", FAILURE]
        assert len(await services.identity.list_customers()) == 1
        assert (await services.audit.verify()).ok
    finally:
        await services.close()


async def test_admin_changes_beside_batched_writer(services: Services) -> None:
    """Admin transactions and the background writer in one process form one chain.

    On SQLite both need the single write lock; neither may wait for the other
    past the busy timeout.
    """
    services.audit.start()
    recorder = AdminRecorder(services.audit, Actor("os:test"))
    pulls = 2000
    customers_added = 40

    async def pull_events() -> None:
        for index in range(pulls):
            await services.audit.record(
                AuditEvent("manifest.pull", actor_account="puller", bytes=index)
            )
            if index % 50 == 0:
                await asyncio.sleep(0.01)

    async def admin_changes() -> None:
        for index in range(customers_added):
            slug = f"customer{index}"
            await admin.add_customer(
                services.identity, slug, slug, None, audit=recorder
            )
            await recorder.run(
                "grant.add",
                f"grant products/* to {slug}",
                admin.add_grant(services.identity, slug, "products/*", "reader", None),
                slug,
            )

    await asyncio.gather(pull_events(), admin_changes())
    await services.audit.close()

    result = await services.audit.verify()
    assert result.ok, result.problem
    assert result.events >= pulls + 2 * customers_added
    assert len(await _events(services, "manifest.pull")) == pulls
    assert len(await _events(services, "customer.add")) == customers_added
    assert len(await _events(services, "grant.add")) == customers_added
    assert len(await services.identity.list_customers()) == customers_added


def _cli_against(
    server: ServerProcess, *arguments: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env=server.environment(),
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_changes_during_pulls_keep_chain(fresh_server: ServerProcess) -> None:
    """CLI processes change accounts while the server records pulls; the chain holds.

    Three CLI processes at a time write administrative transactions while four
    clients pull, so the server's batched writer and the CLI transactions
    append to the same chain at once. Every command must succeed (no "database
    is locked"), `moorage audit verify` must pass, and no event may be lost.
    """
    server = fresh_server
    customer = server.add_customer()
    login, password = server.add_user(customer, "writer")
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        push_image(client, f"{customer}/app", "1.0", small_image())
    pulled: list[int] = []
    pull_errors: list[str] = []
    stop = threading.Event()

    def pull_until_stopped() -> None:
        # A generous timeout: on a loaded machine a pull may wait for the CPU,
        # and a client that gives up on a pull the server completes would
        # count one pull fewer than the server recorded.
        with httpx.Client(
            base_url=server.url, auth=(login, password), timeout=120
        ) as client:
            while not stop.is_set():
                try:
                    pulled.append(pull_image(client, f"{customer}/app", "1.0"))
                except (AssertionError, httpx.HTTPError) as error:
                    pull_errors.append(repr(error))
                    return

    def change_accounts(worker: int) -> list[subprocess.CompletedProcess[str]]:
        slug = f"cli{worker}"
        commands = [
            ["customer", "add", slug],
            ["user", "add", slug, f"alice-{slug}"],
            ["robot", "add", slug, "ci"],
            ["grant", "add", slug, "products/*", "reader"],
            ["customer", "suspend", slug],
            ["customer", "resume", slug],
        ]
        return [_cli_against(server, *command) for command in commands]

    pullers = [threading.Thread(target=pull_until_stopped) for _ in range(4)]
    for puller in pullers:
        puller.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = [
                completed
                for finished in pool.map(change_accounts, range(6))
                for completed in finished
            ]
    finally:
        stop.set()
        for puller in pullers:
            puller.join()
    server.stop()

    assert pull_errors == []
    for completed in results:
        assert completed.returncode == 0, f"{completed.args}: {completed.stderr}"
    verified = _cli_against(server, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert len(pulled) > 0
    manifest_pulls = audit_events(
        server, AuditFilter(account=login, action="manifest.pull")
    )
    assert len(manifest_pulls) == len(pulled)
    # The customer and user made before the pulls were created without events.
    for action in (
        "customer.add",
        "user.add",
        "robot.add",
        "grant.add",
        "customer.suspend",
        "customer.resume",
    ):
        recorded = audit_events(server, AuditFilter(action=action))
        assert [stored.event.outcome for stored in recorded] == ["success"] * 6, action


def test_key_rotation_records_its_start_first(settings: Settings) -> None:
    """`key rotate` writes `key.rotate.start` before any work. When the
    database rejects that event, no key is added and no data key rewrapped.
    When it accepts it, the start event comes right before the end event."""
    asyncio.run(_create_owner_key(settings, "customer:acme"))
    keys = settings.data_dir / "keys"
    key_files = sorted(path.name for path in keys.iterdir())
    reject_audit_events(settings.resolved_database_url, "key.rotate.start")
    before = _snapshot(settings)

    rejected = _cli(settings, "key", "rotate")

    assert rejected.returncode != 0
    assert REJECTED in rejected.stderr, rejected.stderr
    assert _snapshot(settings) == before
    assert sorted(path.name for path in keys.iterdir()) == key_files

    reject_audit_events(settings.resolved_database_url, "none")
    rotated = _cli(settings, "key", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert sorted(path.name for path in keys.iterdir()) != key_files
    events = _snapshot(settings)["audit_events"]
    assert [action for _, action, _ in events[-2:]] == [
        "key.rotate.start",
        "key.rotate",
    ]
