"""Read a test server's audit trail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sqlalchemy import text

from moorage.audit.events import StoredEvent
from moorage.db.audit_store import AuditFilter
from moorage.db.engine import create_engine
from tests.support.database import backend
from tests.support.server import ServerProcess

REJECTED = "audit write rejected by the test trigger"


def audit_events(
    server: ServerProcess, where: AuditFilter | None = None
) -> list[StoredEvent]:
    return server.run_admin(lambda s: s.audit.query(where or AuditFilter(), 100_000))


def wait_for_events(
    server: ServerProcess,
    where: AuditFilter,
    ready: Callable[[list[StoredEvent]], bool],
    timeout: float = 10,
) -> list[StoredEvent]:
    """Poll until `ready` accepts the matching events (the writer batches them)."""
    deadline = time.monotonic() + timeout
    while True:
        found = audit_events(server, where)
        if ready(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def rejecting_statements(action: str) -> list[str]:
    """Return SQL that makes the database reject audit events of one action.

    An action no event has ("none") keeps the trigger but rejects nothing.
    """
    if backend() == "sqlite":
        return [
            "DROP TRIGGER IF EXISTS reject_audit",
            f"CREATE TRIGGER reject_audit BEFORE INSERT ON audit_events "
            f"WHEN NEW.action = '{action}' "
            f"BEGIN SELECT RAISE(ABORT, '{REJECTED}'); END",
        ]
    return [
        "DROP TRIGGER IF EXISTS reject_audit ON audit_events",
        "CREATE OR REPLACE FUNCTION reject_audit() RETURNS trigger "
        f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{REJECTED}'; END $$",
        "CREATE TRIGGER reject_audit BEFORE INSERT ON audit_events FOR EACH ROW "
        f"WHEN (NEW.action = '{action}') EXECUTE FUNCTION reject_audit()",
    ]


async def execute_sql(url: str, statements: list[str]) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


def reject_audit_events(database_url: str, action: str) -> None:
    asyncio.run(execute_sql(database_url, rejecting_statements(action)))
