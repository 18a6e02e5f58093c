"""Read a test server's audit trail."""

from __future__ import annotations

import time
from collections.abc import Callable

from moorage.audit.events import StoredEvent
from moorage.db.audit_store import AuditFilter
from tests.support.server import ServerProcess


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
