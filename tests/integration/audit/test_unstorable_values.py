"""Events with values a database cannot store: NUL and lone surrogates are
replaced before hashing, and an event the database still rejects is replaced by
an `audit.rejected` event instead of blocking the writer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid

import httpx

from moorage.audit.events import (
    AUDIT_IMPORT,
    AUDIT_REJECTED,
    AuditEvent,
    event_dict,
)
from moorage.audit.log import PENDING_DIRECTORY, PENDING_FORMAT
from moorage.db.audit_store import AuditFilter
from moorage.services import Services
from tests.support.audit import audit_events, wait_for_events
from tests.support.server import ServerProcess, unique


def _verify(server: ServerProcess) -> None:
    verified = server.run_admin(lambda services: services.audit.verify())
    assert verified.ok, verified.problem


def _write_failures(server: ServerProcess) -> int:
    return server.log().count("audit write failed")


def test_nul_in_login_is_stored(server: ServerProcess) -> None:
    """A Basic login name with a NUL is recorded with U+FFFD in its place, and
    the events after it are written too."""
    login = unique("ev") + "\0il"
    failures = _write_failures(server)
    credentials = base64.b64encode(f"{login}:x".encode()).decode()
    response = httpx.get(
        f"{server.url}/v2/", headers={"Authorization": f"Basic {credentials}"}
    )
    assert response.status_code == 401
    stored_login = login.replace("\0", "\ufffd")
    events = wait_for_events(
        server, AuditFilter(account=stored_login), lambda found: len(found) == 1
    )
    assert [item.event.action for item in events] == ["auth.login"]

    # The writer goes on: a later event is stored as well.
    later = unique("later")
    httpx.get(f"{server.url}/v2/", auth=(later, "x"))
    assert wait_for_events(server, AuditFilter(account=later), bool)
    assert _write_failures(server) == failures
    _verify(server)


def test_nul_in_reference_is_stored(server: ServerProcess) -> None:
    """A manifest reference with a NUL (from %00 in the path) is recorded."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    url = f"{server.url}/v2/{customer}/app/manifests/a%00b"
    response = httpx.get(url, auth=(login, password))
    assert response.status_code == 404
    events = wait_for_events(
        server,
        AuditFilter(repository=f"{customer}/app", action="manifest.pull"),
        lambda found: len(found) == 1,
    )
    assert len(events) == 1
    assert events[0].event.reference == "a\ufffdb"
    _verify(server)


async def _record_batch(services: Services, events: list[AuditEvent]) -> None:
    """Queue events for the background writer, which takes them as one batch."""
    audit = services.audit
    audit.start()
    for event in events:
        await audit.record(event)
    await audit.close()


def test_rejected_event_replaced(server: ServerProcess) -> None:
    """An event the database rejects (bytes past 64 bits) is stored as an
    audit.rejected event, and the events around it in its batch are stored."""
    account = unique("batch")
    events = [
        AuditEvent("blob.pull", actor_account=account, bytes=1),
        AuditEvent("blob.pull", actor_account=account, bytes=2**63, request_id="r2"),
        AuditEvent("blob.pull", actor_account=account, bytes=3),
    ]
    server.run_admin(lambda services: _record_batch(services, events))

    stored = audit_events(server, AuditFilter(account=account))
    assert [item.event.action for item in stored] == [
        "blob.pull",
        AUDIT_REJECTED,
        "blob.pull",
    ]
    assert [item.event.bytes for item in stored] == [1, None, 3]
    rejected = stored[1].event
    assert rejected.outcome == "failure"
    assert rejected.request_id == "r2"
    assert rejected.reason is not None
    assert rejected.reason.startswith("the database rejected a blob.pull event")
    _verify(server)


def _write_old_pending_file(
    server: ServerProcess, pending_key: bytes, events: list[AuditEvent]
) -> str:
    """Write a file of saved events as a server without the NUL replacement
    wrote it: the NUL is kept in the event lines."""
    file_id = uuid.uuid4().hex
    lines = [json.dumps(event_dict(event), ensure_ascii=False) for event in events]
    assert all("\\u0000" in line for line in lines)
    mac = hmac.new(
        pending_key, "\n".join([file_id, *lines]).encode(), hashlib.sha256
    ).hexdigest()
    header = {PENDING_FORMAT: 1, "id": file_id, "events": len(lines), "mac": mac}
    directory = server.data_dir / PENDING_DIRECTORY
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "audit-pending-20261201T000000Z-1.jsonl"
    path.write_text("\n".join([json.dumps(header), *lines]) + "\n", encoding="utf-8")
    return file_id


async def _pending_key(services: Services) -> bytes:
    assert services.audit.pending_key is not None
    return services.audit.pending_key


def test_old_pending_file_with_nul_imported(fresh_server: ServerProcess) -> None:
    """A file saved at shutdown with NUL in its events is added at the next
    start, with U+FFFD in place of each NUL."""
    server = fresh_server
    pending_key = server.run_admin(_pending_key)
    server.stop()
    account = unique("saved") + "\0x"
    events = [
        AuditEvent("auth.login", outcome="failure", actor_account=account),
        AuditEvent("manifest.pull", actor_account=account, reference="a\0b"),
    ]
    file_id = _write_old_pending_file(server, pending_key, events)

    server.start()
    assert not list((server.data_dir / PENDING_DIRECTORY).glob("*.jsonl"))
    stored = audit_events(server, AuditFilter(account=account.replace("\0", "\ufffd")))
    assert [item.event.action for item in stored] == ["auth.login", "manifest.pull"]
    assert stored[1].event.reference == "a\ufffdb"
    imports = audit_events(server, AuditFilter(action=AUDIT_IMPORT))
    assert [item.event.reference for item in imports] == [file_id]
    _verify(server)
