"""The admin API at /api/v1 against a real server: owners manage their own
customer, nobody reaches another customer's accounts, escalation fails, changes
take effect on the next request and every change is an audit event."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt
import pytest

from moorage.audit.events import StoredEvent
from moorage.db.audit_store import AuditFilter
from tests.support.audit import audit_events, execute_sql, wait_for_events
from tests.support.database import backend
from tests.support.identity import admin_client, bearer, get_token, push_image
from tests.support.registry import wait_for_request
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique

# A password reset and a login run argon2id, which takes seconds on a loaded
# test machine; httpx's default 5 s timeout is too short there.
TIMEOUT = 30
USER_AGENT = "admin-api-test/1"

# Time for the audit writer to store a request's queued events.
REQUEST_EVENT_WRITE_SECONDS = 1.5


def api(server: ServerProcess, auth: tuple[str, str] | None) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.url}/api/v1",
        auth=auth,
        timeout=TIMEOUT,
        headers={"User-Agent": USER_AGENT},
    )


def registry_status(server: ServerProcess, auth: tuple[str, str]) -> int:
    """Return the status of GET /v2/ with these Basic credentials."""
    return httpx.get(f"{server.url}/v2/", auth=auth, timeout=TIMEOUT).status_code


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    errors = response.json()["errors"]
    assert len(errors) >= 1
    return dict(errors[0])


@pytest.fixture(scope="module")
def vendor(server: ServerProcess) -> Iterator[httpx.Client]:
    with api(server, (ADMIN_LOGIN, ADMIN_PASSWORD)) as client:
        yield client


@pytest.fixture(scope="module")
def acme(server: ServerProcess) -> str:
    return server.add_customer()


@pytest.fixture(scope="module")
def globex(server: ServerProcess) -> str:
    return server.add_customer()


def add_user(client: httpx.Client, customer: str, role: str) -> tuple[str, str]:
    login = unique("user")
    response = client.post(
        f"/customers/{customer}/users", json={"login": login, "role": role}
    )
    assert response.status_code == 201, response.text
    return login, response.json()["password"]


@pytest.fixture(scope="module")
def owner(server: ServerProcess, vendor: httpx.Client, acme: str) -> tuple[str, str]:
    """An owner of acme, created by the vendor admin over the API."""
    return add_user(vendor, acme, "owner")


@pytest.fixture
def as_owner(server: ServerProcess, owner: tuple[str, str]) -> Iterator[httpx.Client]:
    with api(server, owner) as client:
        yield client


def test_openapi_document_served(server: ServerProcess) -> None:
    """The OpenAPI document lists the routes and the Basic scheme, without login."""
    response = httpx.get(f"{server.url}/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert "/customers/{customer}/users" in document["paths"]
    assert "/me/tokens" in document["paths"]
    assert document["servers"] == [{"url": "/api/v1"}]
    assert document["components"]["securitySchemes"]["basic"]["scheme"] == "basic"
    docs = httpx.get(f"{server.url}/api/v1/docs")
    assert docs.status_code == 200
    assert "/api/v1/openapi.json" in docs.text


def test_docs_page_files_served_locally(server: ServerProcess) -> None:
    """The /docs page loads Swagger UI's script, styles and icon from this
    server only, and each of them is served."""
    page = httpx.get(f"{server.url}/api/v1/docs").text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources
    for source in sources:
        assert source.startswith("/api/v1/docs/assets/")
        response = httpx.get(f"{server.url}{source}")
        assert response.status_code == 200
        assert response.content
    escaped = httpx.get(f"{server.url}/api/v1/docs/assets/..%2F..%2Fopenapi.json")
    assert escaped.status_code == 404


def test_owner_manages_own_users(
    server: ServerProcess, as_owner: httpx.Client, acme: str
) -> None:
    """An owner adds, shows, resets, disables, enables and deletes a user."""
    created = as_owner.post(
        f"/customers/{acme}/users", json={"login": unique("bob"), "role": "writer"}
    )
    assert created.status_code == 201, created.text
    login, password = created.json()["login"], created.json()["password"]
    assert created.json()["role"] == "writer"
    assert len(password) >= 32
    assert registry_status(server, (login, password)) == 200

    listed = as_owner.get(f"/customers/{acme}/users").json()
    assert login in [user["login"] for user in listed]
    assert all("password" not in user for user in listed)
    shown = as_owner.get(f"/customers/{acme}/users/{login}")
    assert shown.json()["disabled"] is False

    reset = as_owner.post(f"/customers/{acme}/users/{login}/password")
    assert reset.status_code == 200, reset.text
    new_password = reset.json()["password"]
    assert registry_status(server, (login, password)) == 401
    assert registry_status(server, (login, new_password)) == 200

    disabled = as_owner.post(f"/customers/{acme}/users/{login}/disable")
    assert disabled.status_code == 204, disabled.text
    assert registry_status(server, (login, new_password)) == 401
    assert as_owner.get(f"/customers/{acme}/users/{login}").json()["disabled"]
    enabled = as_owner.post(f"/customers/{acme}/users/{login}/enable")
    assert enabled.status_code == 204, enabled.text
    assert registry_status(server, (login, new_password)) == 200

    removed = as_owner.delete(f"/customers/{acme}/users/{login}")
    assert removed.status_code == 204, removed.text
    error_of(as_owner.get(f"/customers/{acme}/users/{login}"), 404)
    assert registry_status(server, (login, new_password)) == 401


def test_owner_manages_own_robots(
    server: ServerProcess, as_owner: httpx.Client, acme: str
) -> None:
    """An owner adds a robot with an expiry, rotates, disables and deletes it."""
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    created = as_owner.post(
        f"/customers/{acme}/robots",
        json={"name": "ci", "role": "reader", "expires_at": expires},
    )
    assert created.status_code == 201, created.text
    login, secret = created.json()["login"], created.json()["secret"]
    assert login == f"{acme}+ci"
    assert created.json()["expires_at"] is not None
    assert registry_status(server, (login, secret)) == 200
    assert [r["login"] for r in as_owner.get(f"/customers/{acme}/robots").json()] == [
        login
    ]

    rotated = as_owner.post(f"/customers/{acme}/robots/ci/secret")
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert rotated.json()["expires_at"] is not None
    assert registry_status(server, (login, secret)) == 401
    assert registry_status(server, (login, new_secret)) == 200

    assert as_owner.post(f"/customers/{acme}/robots/ci/disable").status_code == 204
    assert registry_status(server, (login, new_secret)) == 401
    assert as_owner.post(f"/customers/{acme}/robots/ci/enable").status_code == 204
    assert registry_status(server, (login, new_secret)) == 200

    assert as_owner.delete(f"/customers/{acme}/robots/ci").status_code == 204
    error_of(as_owner.get(f"/customers/{acme}/robots/ci"), 404)
    assert registry_status(server, (login, new_secret)) == 401


def test_owner_manages_own_grants(
    server: ServerProcess, as_owner: httpx.Client, acme: str
) -> None:
    """An owner grants a robot push on one of its repositories, then removes it."""
    robot = as_owner.post(
        f"/customers/{acme}/robots", json={"name": "pusher", "role": "reader"}
    ).json()
    repository = f"{acme}/app"
    scope = f"repository:{repository}:pull,push"
    auth = (robot["login"], robot["secret"])
    assert get_token(server, *auth, scope)["scope"] == f"repository:{repository}:pull"

    granted = as_owner.post(
        f"/customers/{acme}/grants",
        json={"pattern": repository, "role": "writer", "account": robot["login"]},
    )
    assert granted.status_code == 201, granted.text
    grant_id = granted.json()["id"]
    listed = as_owner.get(f"/customers/{acme}/grants").json()
    assert {"id": grant_id, "account": robot["login"]}.items() <= next(
        grant for grant in listed if grant["id"] == grant_id
    ).items()
    assert get_token(server, *auth, scope)["scope"] == scope

    removed = as_owner.delete(f"/customers/{acme}/grants/{grant_id}")
    assert removed.status_code == 204, removed.text
    assert get_token(server, *auth, scope)["scope"] == f"repository:{repository}:pull"


def test_other_customer_is_hidden(
    server: ServerProcess,
    owner: tuple[str, str],
    as_owner: httpx.Client,
    vendor: httpx.Client,
    globex: str,
) -> None:
    """An owner of acme gets for globex what a missing customer gets."""
    victim, _ = add_user(vendor, globex, "writer")
    missing = unique("missing")
    for method, path in [
        ("GET", "/customers/{c}/users"),
        ("GET", f"/customers/{{c}}/users/{victim}"),
        ("POST", f"/customers/{{c}}/users/{victim}/disable"),
        ("DELETE", f"/customers/{{c}}/users/{victim}"),
        ("GET", "/customers/{c}/grants"),
    ]:
        hidden = as_owner.request(method, path.format(c=globex))
        absent = as_owner.request(method, path.format(c=missing))
        error_of(hidden, 404)
        assert hidden.content.replace(globex.encode(), b"C") == absent.content.replace(
            missing.encode(), b"C"
        )
        assert hidden.headers.get("content-type") == absent.headers.get("content-type")
    shown = vendor.get(f"/customers/{globex}/users/{victim}")
    assert shown.status_code == 200
    assert shown.json()["disabled"] is False
    denials = wait_for_events(
        server,
        AuditFilter(account=owner[0], action="access.denied"),
        lambda found: any(globex in (e.event.reason or "") for e in found),
    )
    assert any(f"customer {globex}" in (e.event.reason or "") for e in denials)


@pytest.mark.parametrize("role", ["reader", "writer", "maintainer"])
def test_member_without_owner_role(
    server: ServerProcess, vendor: httpx.Client, acme: str, globex: str, role: str
) -> None:
    """A member gets 403 on its own customer and 404 on another one."""
    member = add_user(vendor, acme, role)
    with api(server, member) as client:
        denied = error_of(client.get(f"/customers/{acme}/users"), 403)
        assert denied["code"] == "DENIED"
        assert "owner" in denied["message"]
        error_of(client.post(f"/customers/{acme}/robots", json={"name": "x"}), 403)
        error_of(client.get(f"/customers/{globex}/users"), 404)
        assert client.get("/me").json()["management_role"] is None


def test_disabled_owner_rejected_next_request(
    server: ServerProcess, vendor: httpx.Client, acme: str
) -> None:
    """Disabling an owner rejects its very next request, cached password or not."""
    owner = add_user(vendor, acme, "owner")
    with api(server, owner) as client:
        assert client.get(f"/customers/{acme}/users").status_code == 200
        disabled = vendor.post(f"/customers/{acme}/users/{owner[0]}/disable")
        assert disabled.status_code == 204
        error = error_of(client.get(f"/customers/{acme}/users"), 401)
        assert error["code"] == "UNAUTHORIZED"
        assert error["message"] == "account is disabled"


def test_owner_cannot_escalate(
    server: ServerProcess,
    as_owner: httpx.Client,
    vendor: httpx.Client,
    acme: str,
    globex: str,
) -> None:
    """Grants outside acme, vendor roles and other customers' grants are rejected."""
    product = unique("products")
    for pattern in [f"{product}/*", product, f"{globex}/*", "*", f"{acme}*", "*/app"]:
        response = as_owner.post(
            f"/customers/{acme}/grants", json={"pattern": pattern, "role": "reader"}
        )
        assert error_of(response, 403)["code"] == "DENIED", pattern
    for role in ["admin", "auditor", "superuser"]:
        response = as_owner.post(
            f"/customers/{acme}/users", json={"login": unique("x"), "role": role}
        )
        message = error_of(response, 400)["message"]
        assert f"invalid role {role!r}" in message
        assert "use one of reader, writer, maintainer, owner" in message
        robot = as_owner.post(
            f"/customers/{acme}/robots", json={"name": "esc", "role": role}
        )
        error_of(robot, 400)
    error_of(
        as_owner.post("/customers/-/users", json={"login": unique("v"), "role": "x"}),
        404,
    )

    outsider, _ = add_user(vendor, globex, "reader")
    to_outsider = as_owner.post(
        f"/customers/{acme}/grants",
        json={"pattern": f"{acme}/app", "role": "owner", "account": outsider},
    )
    error_of(to_outsider, 404)
    globex_grant = vendor.post(
        f"/customers/{globex}/grants", json={"pattern": f"{globex}/x", "role": "reader"}
    ).json()["id"]
    error_of(as_owner.delete(f"/customers/{acme}/grants/{globex_grant}"), 404)
    assert globex_grant in [
        g["id"] for g in vendor.get(f"/customers/{globex}/grants").json()
    ]

    vendor_grant = vendor.post(
        f"/customers/{acme}/grants", json={"pattern": f"{product}/*", "role": "reader"}
    )
    assert vendor_grant.status_code == 201, vendor_grant.text
    vendor_grant_id = vendor_grant.json()["id"]
    error_of(as_owner.delete(f"/customers/{acme}/grants/{vendor_grant_id}"), 403)
    patterns = [g["pattern"] for g in as_owner.get(f"/customers/{acme}/grants").json()]
    assert f"{product}/*" in patterns
    assert not {f"{globex}/*", "*", f"{acme}*", "*/app"} & set(patterns)


def test_auditor_reads_but_cannot_change(
    server: ServerProcess, vendor: httpx.Client, acme: str
) -> None:
    """A vendor auditor lists a customer's accounts and is denied every change."""
    from moorage import admin

    login = unique("auditor")
    created = server.run_admin(
        lambda s: admin.add_vendor_user(s.identity, login, "auditor")
    )
    assert created.password is not None
    with api(server, (login, created.password)) as client:
        assert client.get(f"/customers/{acme}/users").status_code == 200
        denied = client.post(
            f"/customers/{acme}/users", json={"login": unique("x"), "role": "reader"}
        )
        assert "read-only" in error_of(denied, 403)["message"]


def test_robot_created_over_http_pulls_with_skopeo(
    server: ServerProcess, as_owner: httpx.Client, acme: str, tmp_path: Path
) -> None:
    """A reader robot made through the API pulls an image with skopeo."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo missing: apt-get install skopeo")
    repository = f"{acme}/pulled"
    with admin_client(server) as registry:
        pushed = push_image(registry, repository, "1.0")
    robot = as_owner.post(
        f"/customers/{acme}/robots", json={"name": "puller", "role": "reader"}
    ).json()
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    environment = {
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [
            "skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false",
            "--src-creds", f"{robot['login']}:{robot['secret']}",
            f"docker://{server.address}/{repository}:1.0",
            f"oci:{tmp_path / 'out'}:1.0",
        ],
        env=environment, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    index = (tmp_path / "out" / "index.json").read_text()
    assert pushed["manifest"] in index
    layer = pushed["layer"].removeprefix("sha256:")
    assert (tmp_path / "out" / "blobs" / "sha256" / layer).exists()


def _event_of(server: ServerProcess, response: httpx.Response) -> StoredEvent:
    """Return the one administrative event the response's request recorded."""
    request_id = response.headers["X-Request-Id"]
    found = [
        stored
        for stored in audit_events(server)
        if stored.event.request_id == request_id
        and not stored.event.action.startswith("auth.")
    ]
    assert len(found) == 1, [stored.event for stored in found]
    return found[0]


def test_every_change_is_audited(
    server: ServerProcess, as_owner: httpx.Client, owner: tuple[str, str], acme: str
) -> None:
    """Each change records its action with the HTTP caller as the actor."""
    login = unique("audited")
    base = f"/customers/{acme}"
    steps = [
        ("POST", f"{base}/users", {"login": login, "role": "reader"}, "user.add"),
        ("POST", f"{base}/users/{login}/password", None, "user.password_reset"),
        ("POST", f"{base}/users/{login}/disable", None, "user.disable"),
        ("POST", f"{base}/users/{login}/enable", None, "user.enable"),
        ("DELETE", f"{base}/users/{login}", None, "user.remove"),
        ("POST", f"{base}/robots", {"name": "aud"}, "robot.add"),
        ("POST", f"{base}/robots/aud/secret", None, "robot.rotate"),
        ("POST", f"{base}/robots/aud/disable", None, "robot.disable"),
        ("POST", f"{base}/robots/aud/enable", None, "robot.enable"),
        ("DELETE", f"{base}/robots/aud", None, "robot.remove"),
        (
            "POST",
            f"{base}/grants",
            {"pattern": f"{acme}/a", "role": "reader"},
            "grant.add",
        ),
        ("POST", "/me/tokens", {"name": "audited"}, "personal_token.add"),
    ]
    created: dict[str, int] = {}
    for method, path, body, action in steps:
        response = as_owner.request(method, path, json=body)
        assert response.status_code < 300, response.text
        if action in ("grant.add", "personal_token.add"):
            created[action] = response.json()["id"]
        event = _event_of(server, response).event
        assert event.action == action
        assert event.outcome == "success"
        assert event.actor_account == owner[0]
        assert event.actor_customer == acme
        assert event.source_address == "127.0.0.1"
        assert event.user_agent == USER_AGENT
        assert event.repository == f"{acme}/"
        assert event.reason
    for path, action in [
        (f"{base}/grants/{created['grant.add']}", "grant.remove"),
        (f"/me/tokens/{created['personal_token.add']}", "personal_token.revoke"),
    ]:
        response = as_owner.delete(path)
        assert response.status_code == 204, response.text
        assert _event_of(server, response).event.action == action

    rejected = as_owner.post(
        f"{base}/grants", json={"pattern": "products/*", "role": "reader"}
    )
    assert rejected.status_code == 403
    # Request events are written in batches (every 0.5 s by default): wait, so
    # that a second event for the same request would be seen too.
    time.sleep(REQUEST_EVENT_WRITE_SECONDS)
    failure = _event_of(server, rejected).event
    assert failure.action == "grant.add"
    assert failure.outcome == "failure"
    assert "outside this customer's namespaces" in (failure.reason or "")


def test_secrets_never_in_audit_trail(
    server: ServerProcess, as_owner: httpx.Client, acme: str
) -> None:
    """Generated passwords and secrets appear in no audit event."""
    user = as_owner.post(
        f"/customers/{acme}/users", json={"login": unique("s"), "role": "reader"}
    ).json()
    robot = as_owner.post(f"/customers/{acme}/robots", json={"name": "sec"}).json()
    token = as_owner.post("/me/tokens", json={"name": "sec"}).json()
    secrets = [user["password"], robot["secret"], token["token"].rsplit("_", 1)[1]]
    for stored in audit_events(server, AuditFilter(customer=acme)):
        text = repr(stored.event)
        assert not [secret for secret in secrets if secret in text]


def test_personal_tokens_of_me(
    server: ServerProcess, vendor: httpx.Client, acme: str
) -> None:
    """A user creates a token with its password, uses it, and revokes it. An
    owner's token manages nothing, and a token with the owner role is rejected."""
    login, password = add_user(vendor, acme, "owner")
    with api(server, (login, password)) as client:
        as_owner = client.post("/me/tokens", json={"name": "x", "role": "owner"})
        assert "reader, writer or maintainer" in error_of(as_owner, 400)["message"]
        assert client.get("/me/tokens").json() == []
        created = client.post(
            "/me/tokens", json={"name": "laptop", "role": "maintainer"}
        )
        assert created.status_code == 201, created.text
        token = created.json()["token"]
        assert created.json()["expires_at"] is not None
    with api(server, (login, token)) as with_token:
        me = with_token.get("/me").json()
        assert me["personal_token_id"] == created.json()["id"]
        assert me["token_role"] == "maintainer"
        assert me["management_role"] is None
        users = with_token.get(f"/customers/{acme}/users")
        assert users.status_code == 403
        listed = with_token.get("/me/tokens").json()
        assert [t["name"] for t in listed] == ["laptop"]
        assert "token" not in listed[0]
        minted = with_token.post("/me/tokens", json={"name": "another"})
        assert "password" in error_of(minted, 403)["message"]
        revoked = with_token.delete(f"/me/tokens/{created.json()['id']}")
        assert revoked.status_code == 204, revoked.text
        error_of(with_token.get("/me"), 401)


def test_password_reset_revokes_personal_tokens(
    server: ServerProcess, vendor: httpx.Client, as_owner: httpx.Client, acme: str
) -> None:
    """A user's own password change keeps its personal access tokens. An
    owner's reset revokes them, so a token minted with a stolen password stops
    working."""
    login, password = add_user(vendor, acme, "writer")
    with api(server, (login, password)) as client:
        created = client.post("/me/tokens", json={"name": "minted", "role": "writer"})
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    assert registry_status(server, (login, token)) == 200

    changed_password = "changed-" + unique("password")
    changed = httpx.put(
        f"{server.url}/account/password",
        json={"password": changed_password},
        auth=(login, password),
        timeout=TIMEOUT,
    )
    assert changed.status_code == 204, changed.text
    assert registry_status(server, (login, token)) == 200

    reset = as_owner.post(f"/customers/{acme}/users/{login}/password")
    assert reset.status_code == 200, reset.text
    assert registry_status(server, (login, token)) == 401
    with api(server, (login, reset.json()["password"])) as client:
        listed = client.get("/me/tokens").json()
    assert [entry["name"] for entry in listed] == ["minted"]
    assert listed[0]["revoked_at"] is not None


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://attacker.example"},
    ],
)
def test_cross_site_change_rejected(
    server: ServerProcess,
    vendor: httpx.Client,
    as_owner: httpx.Client,
    acme: str,
    headers: dict[str, str],
) -> None:
    """A body-less POST that another site's page sent with the browser's cached
    Basic credentials changes nothing; the same request from this server's
    own page does."""
    login, password = add_user(vendor, acme, "reader")
    path = f"/customers/{acme}/users/{login}/disable"

    forged = as_owner.post(path, headers=headers)
    assert "cross-site" in error_of(forged, 403)["message"]
    assert registry_status(server, (login, password)) == 200

    own_page = {"Sec-Fetch-Site": "same-origin", "Origin": server.url}
    disabled = as_owner.post(path, headers=own_page)
    assert disabled.status_code == 204, disabled.text
    assert registry_status(server, (login, password)) == 401


def test_expired_personal_token_says_expired(
    server: ServerProcess, vendor: httpx.Client, acme: str
) -> None:
    """A bearer token issued under a personal access token that has expired since
    is rejected with a message that says expired, not revoked."""
    login, password = add_user(vendor, acme, "reader")
    with api(server, (login, password)) as client:
        expires = datetime.now(UTC) + timedelta(seconds=5)
        created = client.post(
            "/me/tokens", json={"name": "short", "expires_at": expires.isoformat()}
        )
        assert created.status_code == 201, created.text
    token = get_token(server, login, str(created.json()["token"]))
    assert httpx.get(f"{server.url}/v2/", headers=bearer(token)).status_code == 200
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.5)

    response = httpx.get(f"{server.url}/v2/", headers=bearer(token))
    message = error_of(response, 401)["message"]
    assert "expired" in message
    assert "revoked" not in message


def test_role_change_applies_at_once(
    server: ServerProcess, as_owner: httpx.Client, acme: str
) -> None:
    """An owner lowers a writer to reader: its earlier push token stops pushing."""
    login, password = add_user(as_owner, acme, "writer")
    repository = f"{acme}/role-{uuid.uuid4().hex[:6]}"
    token = get_token(server, login, password, f"repository:{repository}:pull,push")
    upload = f"{server.url}/v2/{repository}/blobs/uploads/"
    assert httpx.post(upload, headers=bearer(token)).status_code == 202
    changed = as_owner.put(
        f"/customers/{acme}/users/{login}/role", json={"role": "reader"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["role"] == "reader"
    denied = httpx.post(upload, headers=bearer(token))
    assert denied.status_code == 403, denied.text
    invalid = as_owner.put(
        f"/customers/{acme}/users/{login}/role", json={"role": "admin"}
    )
    assert "invalid role" in error_of(invalid, 400)["message"]
    events = audit_events(server, AuditFilter(action="user.role"))
    reasons = [stored.event.reason or "" for stored in events]
    assert f"user {login} of {acme} to reader" in reasons


def test_personal_token_with_patterns(
    server: ServerProcess, vendor: httpx.Client, acme: str
) -> None:
    """A token created with repository patterns reaches only those repositories."""
    login, password = add_user(vendor, acme, "writer")
    body = {"name": "ci", "role": "writer", "repositories": [f"{acme}/app"]}
    with api(server, (login, password)) as client:
        created = client.post("/me/tokens", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["repositories"] == [f"{acme}/app"]
        listed = client.get("/me/tokens").json()
        assert listed[0]["repositories"] == [f"{acme}/app"]
        invalid = client.post("/me/tokens", json={**body, "repositories": ["Bad//"]})
        assert invalid.status_code == 400, invalid.text
    token = str(created.json()["token"])
    inside = f"repository:{acme}/app:pull,push"
    outside = f"repository:{acme}/other:pull,push"
    issued = get_token(server, login, token, inside, outside)
    claims = jwt.decode(str(issued["token"]), options={"verify_signature": False})
    assert claims["access"] == [
        {"type": "repository", "name": f"{acme}/app", "actions": ["pull", "push"]}
    ]


def test_robot_has_no_personal_tokens(
    server: ServerProcess, as_owner: httpx.Client, acme: str
) -> None:
    robot = as_owner.post(
        f"/customers/{acme}/robots", json={"name": "notokens", "role": "owner"}
    ).json()
    with api(server, (robot["login"], robot["secret"])) as client:
        assert client.get("/me").json()["kind"] == "robot"
        message = error_of(client.post("/me/tokens", json={}), 403)["message"]
        assert "rotate the robot's secret" in message


def test_invalid_input_and_conflicts(
    server: ServerProcess, as_owner: httpx.Client, acme: str
) -> None:
    """Bad input gets 400 with the value and the fix, a taken name 409."""
    base = f"/customers/{acme}"
    bad_login = error_of(
        as_owner.post(f"{base}/users", json={"login": "no spaces", "role": "reader"}),
        400,
    )
    assert bad_login["code"] == "INVALID_INPUT"
    assert "'no spaces'" in bad_login["message"]
    assert "use up to 128 letters" in bad_login["message"]

    missing = error_of(as_owner.post(f"{base}/users", json={"role": "reader"}), 400)
    assert missing["message"] == "invalid body.login: Field required; add it"
    extra = error_of(
        as_owner.post(f"{base}/users", json={"login": "a1", "rol": "reader"}), 400
    )
    assert "body.rol" in extra["message"]
    assert "remove it" in extra["message"]
    not_json = as_owner.post(
        f"{base}/users", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert error_of(not_json, 400)["code"] == "INVALID_INPUT"
    nested = as_owner.post(
        f"{base}/users",
        content=b"[" * 30_000 + b"]" * 30_000,
        headers={"Content-Type": "application/json"},
    )
    assert error_of(nested, 400)["code"] == "INVALID_INPUT"
    past = error_of(
        as_owner.post(
            f"{base}/robots", json={"name": "old", "expires_at": "2020-01-01T00:00:00Z"}
        ),
        400,
    )
    assert "is in the past" in past["message"]
    naive = error_of(
        as_owner.post(
            f"{base}/robots", json={"name": "old", "expires_at": "2030-01-01T00:00:00"}
        ),
        400,
    )
    assert "add a zone" in naive["message"]
    bad_pattern = error_of(
        as_owner.post(f"{base}/grants", json={"pattern": "A B", "role": "reader"}), 400
    )
    assert "invalid pattern 'A B'" in bad_pattern["message"]
    bad_id = error_of(as_owner.delete(f"{base}/grants/abc"), 400)
    assert "'abc'" in bad_id["message"]

    login = unique("twice")
    first = as_owner.post(f"{base}/users", json={"login": login, "role": "reader"})
    assert first.status_code == 201
    again = as_owner.post(f"{base}/users", json={"login": login, "role": "reader"})
    conflict = error_of(again, 409)
    assert conflict["code"] == "CONFLICT"
    assert login in conflict["message"]
    large = as_owner.post(f"{base}/users", content=b" " * 100_000)
    assert error_of(large, 413)["code"] == "SIZE_INVALID"
    error_of(as_owner.get("/no-such-page"), 404)


def test_every_invalid_field_reported(as_owner: httpx.Client, acme: str) -> None:
    """A body with several invalid values gets one error entry for each."""
    base = f"/customers/{acme}"
    user = as_owner.post(f"{base}/users", json={"login": "no spaces", "role": "boss"})
    assert user.status_code == 400, user.text
    messages = [entry["message"] for entry in user.json()["errors"]]
    assert len(messages) == 2
    assert "invalid role 'boss'" in messages[0]
    assert "invalid user name 'no spaces'" in messages[1]

    body = {"pattern": "A B", "role": "boss", "until": "2020-01-01T00:00:00Z"}
    grant = as_owner.post(f"{base}/grants", json=body)
    assert grant.status_code == 400, grant.text
    entries = grant.json()["errors"]
    assert {entry["code"] for entry in entries} == {"INVALID_INPUT"}
    messages = [entry["message"] for entry in entries]
    assert len(messages) == 3
    assert "invalid pattern 'A B'" in messages[0]
    assert "invalid role 'boss'" in messages[1]
    assert "is in the past" in messages[2]

    body = {"name": "Bad Name", "role": "boss", "expires_at": "2020-01-01T00:00:00Z"}
    robot = as_owner.post(f"{base}/robots", json=body)
    assert robot.status_code == 400, robot.text
    assert len(robot.json()["errors"]) == 3


def test_grant_until_future_and_utc(as_owner: httpx.Client, acme: str) -> None:
    """A grant's end must be in the future; the response gives it in UTC."""
    grants = f"/customers/{acme}/grants"
    for until in ("2020-01-01T00:00:00Z", "0001-01-01T00:00:00-23:59"):
        body = {"pattern": f"{acme}/y", "role": "reader", "until": until}
        past = error_of(as_owner.post(grants, json=body), 400)
        assert past["code"] == "INVALID_INPUT"
        assert "is in the past" in past["message"]
    too_late = {"pattern": f"{acme}/y", "role": "reader"}
    too_late["until"] = "9999-12-31T23:59:59-23:59"
    out_of_range = error_of(as_owner.post(grants, json=too_late), 400)
    assert "out of range" in out_of_range["message"]

    body = {"pattern": f"{acme}/z", "role": "reader"}
    body["until"] = "2030-06-30T00:00:00+02:00"
    created = as_owner.post(grants, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["until"] == "2030-06-29T22:00:00Z"
    listed = [g for g in as_owner.get(grants).json() if g["id"] == created.json()["id"]]
    assert listed[0]["until"] == created.json()["until"]


# Past the 32-bit id columns of PostgreSQL, and past 64 bits.
OVERSIZED_IDS = [str(2**31), str(2**63 - 1), "9" * 23]


@pytest.mark.parametrize("huge", OVERSIZED_IDS)
def test_oversized_ids_not_found(as_owner: httpx.Client, acme: str, huge: str) -> None:
    """An id past the range of the id column gets 404, not 500."""
    grant = error_of(as_owner.delete(f"/customers/{acme}/grants/{huge}"), 404)
    assert grant["code"] == "NOT_FOUND"
    token = error_of(as_owner.delete(f"/me/tokens/{huge}"), 404)
    assert token["code"] == "NOT_FOUND"


@pytest.mark.parametrize("control", ["\x00", "\x1b", "\x7f"])
def test_control_characters_rejected(
    vendor: httpx.Client,
    as_owner: httpx.Client,
    owner: tuple[str, str],
    acme: str,
    control: str,
) -> None:
    """A control character in any text of a body gets 400 INVALID_INPUT, on
    PostgreSQL too, where a NUL cannot be stored or looked up."""
    bad = f"a{control}b"
    base = f"/customers/{acme}"
    requests = [
        (as_owner, "POST", "/me/tokens", {"name": bad, "role": "reader"}),
        (as_owner, "POST", "/me/tokens", {"name": "n", "repositories": [bad]}),
        (vendor, "POST", f"{base}/users", {"login": bad}),
        (vendor, "PUT", f"{base}/users/{owner[0]}/role", {"role": bad}),
        (vendor, "POST", f"{base}/robots", {"name": bad}),
        (vendor, "POST", f"{base}/grants", {"pattern": bad, "role": "reader"}),
        (
            vendor,
            "POST",
            f"{base}/grants",
            {"pattern": f"{acme}/x", "role": "reader", "account": bad},
        ),
    ]
    for client, method, path, body in requests:
        response = client.request(method, path, json=body)
        problem = error_of(response, 400)
        assert problem["code"] == "INVALID_INPUT", (path, body)
        assert f"U+{ord(control):04X}" in problem["message"], (path, body)


@pytest.mark.parametrize("control", ["%00", "%1B"])
def test_control_characters_in_path_rejected(
    vendor: httpx.Client, acme: str, control: str
) -> None:
    """A control character in a path parameter gets 400, not 500."""
    for path in [
        f"/customers/a{control}b",
        f"/customers/{acme}/users/a{control}b",
        f"/customers/{acme}/robots/a{control}b",
    ]:
        problem = error_of(vendor.get(path), 400)
        assert problem["code"] == "INVALID_INPUT", path


@pytest.mark.parametrize("huge", [*OVERSIZED_IDS, "\u00b2"])
def test_personal_token_oversized_id_rejected(server: ServerProcess, huge: str) -> None:
    """A personal access token whose id part no row can have is a failed login
    (401) on the registry and the token endpoint, not a 500."""
    token = f"moorage_pat_{huge}_abcdefghijklmnopqrstuvwxyzABCDEF"
    # A login name of its own for each request, so that no name reaches the
    # failed-login limit.
    assert registry_status(server, (unique("pete"), token)) == 401
    response = httpx.get(f"{server.url}/token", auth=(unique("pete"), token))
    assert response.status_code == 401, response.text


def test_registry_bearer_token_rejected(
    server: ServerProcess, owner: tuple[str, str], acme: str
) -> None:
    """A registry token is no admin credential: 401 naming HTTP Basic."""
    token = get_token(server, *owner, f"repository:{acme}/app:pull")
    response = httpx.get(
        f"{server.url}/api/v1/customers/{acme}/users", headers=bearer(token)
    )
    error = error_of(response, 401)
    assert "HTTP Basic" in error["message"]
    assert response.headers["WWW-Authenticate"] == 'Basic realm="moorage"'
    anonymous = httpx.get(f"{server.url}/api/v1/me")
    assert error_of(anonymous, 401)["code"] == "UNAUTHORIZED"


def test_failed_logins_audited_and_throttled(
    server: ServerProcess, vendor: httpx.Client, acme: str
) -> None:
    """Wrong passwords get 401, are audited, and are throttled like /v2/."""
    login, _ = add_user(vendor, acme, "owner")
    with api(server, (login, "wrong-password-" + uuid.uuid4().hex)) as client:
        statuses = [client.get("/me").status_code for _ in range(7)]
    assert statuses[:5] == [401] * 5
    assert statuses[-1] == 429
    failures = wait_for_events(
        server,
        AuditFilter(account=login, action="auth.login", outcome="failure"),
        lambda found: len(found) >= 5,
    )
    assert len(failures) >= 5
    assert failures[0].event.reason == "invalid username or password"


def test_customer_list_per_caller(
    server: ServerProcess,
    vendor: httpx.Client,
    as_owner: httpx.Client,
    acme: str,
    globex: str,
) -> None:
    """The vendor lists every customer, an owner its own, a member none."""
    everyone = [customer["slug"] for customer in vendor.get("/customers").json()]
    assert acme in everyone
    assert globex in everyone
    own = as_owner.get("/customers").json()
    assert [customer["slug"] for customer in own] == [acme]
    assert own[0]["namespaces"] == [acme]
    assert own[0]["status"] == "active"
    assert as_owner.get(f"/customers/{acme}").json()["slug"] == acme
    error_of(as_owner.get(f"/customers/{globex}"), 404)
    member = add_user(vendor, acme, "writer")
    with api(server, member) as client:
        assert client.get("/customers").json() == []
        error_of(client.get(f"/customers/{acme}"), 403)


def _reject_personal_tokens(database_url: str) -> None:
    """Make the database reject every insert into personal_tokens."""
    if backend() == "sqlite":
        statements = [
            "CREATE TRIGGER reject_tokens BEFORE INSERT ON personal_tokens "
            "BEGIN SELECT RAISE(ABORT, 'rejected by the test trigger'); END"
        ]
    else:
        statements = [
            "CREATE FUNCTION reject_tokens() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'rejected by the test trigger'; END $$",
            "CREATE TRIGGER reject_tokens BEFORE INSERT ON personal_tokens "
            "FOR EACH ROW EXECUTE FUNCTION reject_tokens()",
        ]
    asyncio.run(execute_sql(database_url, statements))


def test_database_error_log_hides_values(fresh_server: ServerProcess) -> None:
    """The logged database error of a failed insert names no bound value, so
    the token's HMAC hash and name stay out of the server log."""
    customer = fresh_server.add_customer()
    login, password = fresh_server.add_user(customer, "reader")
    _reject_personal_tokens(fresh_server.database_url)
    name = unique("bound-value")
    with api(fresh_server, (login, password)) as client:
        response = client.post("/me/tokens", json={"name": name, "role": "reader"})
    assert response.status_code == 500, response.text

    wait_for_request(fresh_server, "/api/v1/me/tokens", 1, "UNKNOWN")
    log = fresh_server.log()
    assert "rejected by the test trigger" in log
    assert "SQL parameters hidden" in log
    assert name not in log
