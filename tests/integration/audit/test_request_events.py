"""Audit events recorded by a real server for registry requests."""

from __future__ import annotations

import httpx
import pytest
from starlette.routing import Route

from moorage.api.app import build_routes
from moorage.api.observe import ROUTE_ACTIONS
from moorage.audit.events import StoredEvent
from moorage.db.audit_store import AuditFilter
from tests.support.audit import audit_events, wait_for_events
from tests.support.oci_client import pull_image, push_image, small_image
from tests.support.server import ServerProcess, unique

READ_METHODS = {"GET", "HEAD"}
# Reads that are audited as well, because they hand out content or tokens.
AUDITED_READS = {("get_manifest", "GET"), ("get_blob", "GET"), ("issue_token", "GET")}


def _actions(events: list[StoredEvent]) -> list[str]:
    return [item.event.action for item in events]


@pytest.fixture
def writer(server: ServerProcess) -> tuple[str, str, str]:
    """A customer with a writer-role user: (customer, login, password)."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "maintainer")
    return customer, login, password


def test_route_table_changes_are_audited(server: ServerProcess) -> None:
    """Every route that changes something has an audit action."""
    routes = server.run_admin(lambda s: _routes(s))
    changing = {
        (route.endpoint.__name__, method)
        for route in routes
        for method in route.methods or ()
        if method not in READ_METHODS
    }
    assert changing, "no changing routes found"
    missing = changing - set(ROUTE_ACTIONS)
    assert not missing, f"routes without an audit action: {sorted(missing)}"
    reads = set(ROUTE_ACTIONS) - changing
    assert reads == AUDITED_READS


async def _routes(services):  # type: ignore[no-untyped-def]
    return [route for route in build_routes(services) if isinstance(route, Route)]


def test_push_pull_delete_events(
    server: ServerProcess, writer: tuple[str, str, str]
) -> None:
    """Push, pull, upload cancel and deletes each produce their event with the actor."""
    customer, login, password = writer
    repository = f"{customer}/app"
    image = small_image()
    # The shared server may be busy with other tests' large transfers.
    with httpx.Client(
        base_url=server.url, auth=(login, password), timeout=30
    ) as client:
        push_image(client, repository, "1.0", image)
        pulled = pull_image(client, repository, "1.0")
        started = client.post(f"/v2/{repository}/blobs/uploads/")
        location = started.headers["Location"]
        assert client.patch(location, content=b"abc").status_code == 202
        assert client.delete(location).status_code == 204
        manifest_url = f"/v2/{repository}/manifests/{image.manifest.digest}"
        assert client.delete(manifest_url).status_code == 202
        blob_url = f"/v2/{repository}/blobs/{image.layer.digest}"
        assert client.delete(blob_url).status_code == 202

    expected = [
        "blob.push",
        "blob.push",
        "manifest.push",
        "manifest.pull",
        "blob.pull",
        "blob.pull",
        "upload.start",
        "upload.append",
        "upload.cancel",
        "manifest.delete",
        "blob.delete",
    ]
    where = AuditFilter(account=login)
    found = wait_for_events(
        server, where, lambda events: len(_actions(events)) >= len(expected) + 11
    )
    requests = [e for e in found if not e.event.action.startswith("auth.")]
    assert _actions(requests) == expected
    for item in requests:
        assert item.event.actor_customer == customer
        assert item.event.repository == repository
        assert item.event.outcome == "success"
        assert item.event.source_address == "127.0.0.1"
        assert item.event.user_agent is not None
        assert item.event.request_id
    pull = requests[3].event
    assert pull.reference == "1.0"
    assert pull.digest == image.manifest.digest
    blob_pulls = [r.event for r in requests if r.event.action == "blob.pull"]
    assert {b.link for b in blob_pulls} == {pull.request_id}
    assert sum(b.bytes or 0 for b in blob_pulls) + (pull.bytes or 0) == pulled
    assert requests[1].event.bytes == image.layer.size
    logins = [e for e in found if e.event.action == "auth.login"]
    assert all(e.event.outcome == "success" for e in logins)


def test_token_issue_event(server: ServerProcess, writer: tuple[str, str, str]) -> None:
    """A token request records the login and the scopes granted, never the token."""
    customer, login, password = writer
    scope = f"repository:{customer}/app:pull,push"
    response = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "scope": scope},
        auth=(login, password),
    )
    assert response.status_code == 200
    token = response.json()["token"]
    where = AuditFilter(account=login, action="token.issue")
    found = wait_for_events(server, where, lambda events: len(events) == 1)
    assert len(found) == 1
    assert found[0].event.reason == scope
    everything = audit_events(server, AuditFilter(account=login))
    text = "\n".join(str(item.to_dict()) for item in everything)
    assert token not in text
    assert password not in text


def test_failed_logins_recorded(
    server: ServerProcess, writer: tuple[str, str, str]
) -> None:
    """Wrong passwords at /v2/ and /token are failures with a reason, no secret."""
    _, login, _ = writer
    bad = "wrong-password-value-1"
    assert httpx.get(f"{server.url}/v2/", auth=(login, bad)).status_code == 401
    assert httpx.get(f"{server.url}/token", auth=(login, bad)).status_code == 401
    found = wait_for_events(
        server, AuditFilter(account=login, outcome="failure"), lambda e: len(e) >= 2
    )
    assert _actions(found) == ["auth.login", "auth.login"]
    for item in found:
        assert item.event.reason == "invalid username or password"
        assert bad not in str(item.to_dict())


def test_bad_bearer_token_recorded(server: ServerProcess) -> None:
    """A forged bearer token is an auth.token failure."""
    agent = unique("agent")
    response = httpx.get(
        f"{server.url}/v2/",
        headers={"Authorization": "Bearer not.a.token", "User-Agent": agent},
    )
    assert response.status_code == 401
    found = wait_for_events(
        server,
        AuditFilter(action="auth.token"),
        lambda e: any(i.event.user_agent == agent for i in e),
    )
    mine = [i for i in found if i.event.user_agent == agent]
    assert len(mine) == 1
    assert mine[0].event.outcome == "failure"
    assert (mine[0].event.reason or "").startswith("invalid token")


def test_denials_recorded(server: ServerProcess, writer: tuple[str, str, str]) -> None:
    """Pulling another customer's repository and pushing as a reader are denials."""
    customer, _, _ = writer
    other = server.add_customer()
    reader, password = server.add_user(customer, "reader")
    with httpx.Client(base_url=server.url, auth=(reader, password)) as client:
        hidden = client.get(f"/v2/{other}/app/manifests/latest")
        assert hidden.status_code == 404
        push = client.post(f"/v2/{customer}/app/blobs/uploads/")
        assert push.status_code == 403
    found = wait_for_events(
        server,
        AuditFilter(account=reader, action="access.denied"),
        lambda e: len(e) >= 2,
    )
    assert [i.event.repository for i in found] == [f"{other}/app", f"{customer}/app"]
    assert found[0].event.reason == f"no pull permission on {other}/app"
    assert found[1].event.reason == f"no push permission on {customer}/app"


def test_failed_blob_pull_names_digest(
    server: ServerProcess, writer: tuple[str, str, str]
) -> None:
    """A pull of a blob the repository does not have is a failure that names
    the digest asked for."""
    customer, login, password = writer
    repository = f"{customer}/{unique('app')}"
    digest = "sha256:" + "ab" * 32
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        response = client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 404
    found = wait_for_events(
        server,
        AuditFilter(repository=repository, action="blob.pull"),
        lambda e: len(e) >= 1,
    )
    assert [(i.event.outcome, i.event.digest) for i in found] == [("failure", digest)]
    assert found[0].event.reason == "BLOB_UNKNOWN"


def test_oauth_and_password_change_events(
    server: ServerProcess, writer: tuple[str, str, str]
) -> None:
    """The OAuth2 password grant and a password change each record their event."""
    customer, login, password = writer
    form = {
        "grant_type": "password",
        "username": login,
        "password": password,
        "service": "moorage",
        "scope": f"repository:{customer}/app:pull",
    }
    assert httpx.post(f"{server.url}/token", data=form).status_code == 200
    bad = {**form, "password": "wrong-password-value-2"}
    assert httpx.post(f"{server.url}/token", data=bad).status_code == 401
    changed = httpx.put(
        f"{server.url}/account/password",
        json={"password": "a-new-password-for-alice-9"},
        auth=(login, password),
    )
    assert changed.status_code == 204
    expected = ["auth.login", "token.issue", "auth.login", "auth.login"]
    expected.append("account.password_change")
    found = wait_for_events(
        server, AuditFilter(account=login), lambda e: len(e) >= len(expected)
    )
    assert _actions(found) == expected
    assert [e.event.outcome for e in found] == [
        "success",
        "success",
        "failure",
        "success",
        "success",
    ]
    assert "a-new-password-for-alice-9" not in str([e.to_dict() for e in found])
