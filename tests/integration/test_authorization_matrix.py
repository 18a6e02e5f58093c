"""The authorization matrix: every subject x every registry endpoint x three
namespaces (the subject's own, one granted to it, another customer's), each cell
with the status the access rules demand.

The rows come from ENDPOINTS, and test_matrix_covers_every_route walks the
application's route table, so a new route without matrix rows (or a reason in
OTHER_ROUTES) fails the suite. Routes of the admin API mounted at /api/v1 need
rows in test_admin_api_matrix.API_ENDPOINTS instead. Expected statuses are
derived from the rules in docs/access-control.md, not from the implementation:

- no credentials, a disabled account: 401 everywhere;
- the action is allowed: the endpoint's success status;
- the caller may pull but not take this action: 403;
- the caller may not even pull: what a missing repository gets (404 for reads
  and deletes, 403 for pushes, which never reveal existence either).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import BaseRoute, Mount, Route

from moorage import admin
from moorage.api.admin import PREFIX as ADMIN_API_PREFIX
from moorage.api.admin import AdminApiOnFirstUse
from moorage.api.admin.app import DOCS_ASSETS
from moorage.api.admin.app import ROUTERS as ADMIN_API_ROUTERS
from moorage.api.app import build_routes
from moorage.db.schema import grants
from tests.integration.test_admin_api_matrix import API_ENDPOINTS, API_OTHER_ROUTES
from tests.support.identity import (
    OCI_MANIFEST,
    add_grant,
    admin_client,
    bearer,
    digest_of,
    end_in_past,
    get_token,
    manifest_body,
    push_blob,
    push_image,
    start_upload,
)
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique

PULL, PUSH, DELETE = "pull", "push", "delete"
ROLE_RIGHTS = {
    "reader": {PULL},
    "writer": {PULL, PUSH},
    "maintainer": {PULL, PUSH, DELETE},
    "owner": {PULL, PUSH, DELETE},
    "admin": {PULL, PUSH, DELETE},
    "auditor": {PULL},
}
COLUMNS = ("own", "granted", "other")
SUBJECTS = (
    "none",
    "reader",
    "writer",
    "maintainer",
    "owner",
    "vendor-admin",
    "auditor",
    "disabled",
    "expired-grant",
)

MANIFEST = "/v2/{name:path}/manifests/{reference}"
BLOB = "/v2/{name:path}/blobs/{digest}"
UPLOADS = "/v2/{name:path}/blobs/uploads/"
SESSION = "/v2/{name:path}/blobs/uploads/{upload_id}"


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    route: str
    # The right it needs: pull, push or delete; "login" for non-repository routes.
    needs: str
    success: int
    # The status when the caller may not pull the repository.
    hidden: int


ENDPOINTS = (
    Endpoint("version_check", "GET", "/v2/", "login", 200, 200),
    Endpoint("catalog", "GET", "/v2/_catalog", "login", 200, 200),
    Endpoint("list_tags", "GET", "/v2/{name:path}/tags/list", PULL, 200, 404),
    Endpoint("get_manifest", "GET", MANIFEST, PULL, 200, 404),
    Endpoint("head_manifest", "HEAD", MANIFEST, PULL, 200, 404),
    Endpoint("put_manifest", "PUT", MANIFEST, PUSH, 201, 403),
    Endpoint("delete_manifest", "DELETE", MANIFEST, DELETE, 202, 404),
    Endpoint("start_upload", "POST", UPLOADS, PUSH, 202, 403),
    Endpoint("append_upload", "PATCH", SESSION, PUSH, 202, 403),
    Endpoint("finish_upload", "PUT", SESSION, PUSH, 201, 403),
    Endpoint("upload_status", "GET", SESSION, PULL, 204, 404),
    Endpoint("cancel_upload", "DELETE", SESSION, PUSH, 204, 403),
    Endpoint("get_blob", "GET", BLOB, PULL, 200, 404),
    Endpoint("head_blob", "HEAD", BLOB, PULL, 200, 404),
    Endpoint("delete_blob", "DELETE", BLOB, DELETE, 202, 404),
    # A repository without referrers, or a missing one, gets an empty index.
    Endpoint("referrers", "GET", "/v2/{name:path}/referrers/{digest}", PULL, 200, 200),
)
# Routes outside the registry API, and the tests that check who may use them.
OTHER_ROUTES = {
    ("/token", "GET"): "test_token_service.py",
    ("/token", "POST"): "test_token_service.py",
    ("/token/jwks", "GET"): "test_token_service.py (public keys, no login)",
    ("/account/password", "PUT"): "test_identity.py",
    ("/healthz", "GET"): "health checks need no login",
    ("/readyz", "GET"): "health checks need no login",
    ("/metrics", "GET"): "test_metrics.py (no login, or metrics_token when set)",
    ("/portal", "GET"): "test_portal_api.py (a public page, no customer data)",
    ("/portal/{name}", "GET"): "test_portal_api.py (its script and styles)",
}


def rights_of(subject: str, column: str) -> set[str] | None:
    """Return what a subject may do in a column's repository; None: not logged in."""
    if subject in ("none", "disabled"):
        return None
    if subject == "vendor-admin":
        return ROLE_RIGHTS["admin"]
    if subject == "auditor":
        return ROLE_RIGHTS["auditor"]
    if subject == "expired-grant":
        return ROLE_RIGHTS["reader"] if column == "own" else set()
    return ROLE_RIGHTS[subject] if column in ("own", "granted") else set()


def expected_status(subject: str, endpoint: Endpoint, column: str) -> int:
    rights = rights_of(subject, column)
    if rights is None:
        return 401
    if endpoint.needs == "login" or endpoint.needs in rights:
        return endpoint.success
    if PULL in rights:
        return 403
    return endpoint.hidden


@dataclass
class World:
    repositories: dict[str, str]
    images: dict[str, dict[str, str]]
    sessions: dict[str, str]
    # subject -> column -> headers (a bearer token for that repository)
    headers: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    catalog_headers: dict[str, dict[str, str]] = field(default_factory=dict)


def _all_actions(repository: str) -> str:
    return f"repository:{repository}:pull,push,delete"


def _subject_login(
    server: ServerProcess, world: World, subject: str
) -> tuple[str, str]:
    """Create the subject's account and return its credentials."""
    customer = world.repositories["own"].split("/")[0]
    granted_namespace = world.repositories["granted"].split("/")[0]
    if subject == "vendor-admin":
        return ADMIN_LOGIN, ADMIN_PASSWORD
    if subject == "auditor":
        login = unique("auditor")
        created = server.run_admin(
            lambda s: admin.add_vendor_user(s.identity, login, "auditor")
        )
        assert created.password is not None
        return login, created.password
    role = {"disabled": "writer", "expired-grant": "reader"}.get(subject, subject)
    login, password = server.add_user(customer, role)
    grant_id = add_grant(
        server, customer, f"{granted_namespace}/*", role, account=login
    )
    if subject == "expired-grant":
        end_in_past(server, grants, "until", id=grant_id)
    return login, password


@pytest.fixture(scope="module")
def world(server: ServerProcess) -> World:
    """Three repositories with content, and a token for every subject and column."""
    own = server.add_customer()
    other = server.add_customer()
    repositories = {
        "own": f"{own}/app",
        "granted": f"{unique('prod')}/app",
        "other": f"{other}/app",
    }
    with admin_client(server) as client:
        images = {
            column: push_image(client, name) for column, name in repositories.items()
        }
        sessions = {
            column: start_upload(client, name) for column, name in repositories.items()
        }
    world = World(repositories, images, sessions)
    for subject in SUBJECTS:
        if subject == "none":
            world.headers[subject] = {column: {} for column in COLUMNS}
            world.catalog_headers[subject] = {}
            continue
        login, password = _subject_login(server, world, subject)
        world.headers[subject] = {
            column: bearer(get_token(server, login, password, _all_actions(name)))
            for column, name in repositories.items()
        }
        world.catalog_headers[subject] = bearer(
            get_token(server, login, password, "registry:catalog:*")
        )
        if subject == "disabled":
            server.run_admin(
                lambda s, login=login: admin.set_enabled(
                    s.identity, own, login, "user", False
                )
            )
    return world


def _perform(
    client: httpx.Client,
    setup: httpx.Client,
    endpoint: Endpoint,
    world: World,
    column: str,
    headers: dict[str, str],
) -> httpx.Response:
    """Prepare what the cell needs (as the vendor admin), then send its request."""
    name = world.repositories[column]
    image = world.images[column]
    if endpoint.name == "version_check":
        return client.get("/v2/", headers=headers)
    if endpoint.name == "catalog":
        return client.get("/v2/_catalog", params={"n": 10000}, headers=headers)
    if endpoint.name == "list_tags":
        return client.get(f"/v2/{name}/tags/list", headers=headers)
    if endpoint.name in ("get_manifest", "head_manifest"):
        return client.request(
            endpoint.method,
            f"/v2/{name}/manifests/latest",
            headers={**headers, "Accept": OCI_MANIFEST},
        )
    if endpoint.name == "put_manifest":
        body = manifest_body(
            image["config_bytes"].encode(), image["layer_bytes"].encode()
        )
        return client.put(
            f"/v2/{name}/manifests/t{uuid.uuid4().hex[:8]}",
            content=body,
            headers={**headers, "Content-Type": OCI_MANIFEST},
        )
    if endpoint.name == "delete_manifest":
        body = manifest_body(
            image["config_bytes"].encode(), image["layer_bytes"].encode()
        )
        pushed = setup.put(
            f"/v2/{name}/manifests/{digest_of(body)}",
            content=body,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert pushed.status_code == 201
        return client.delete(f"/v2/{name}/manifests/{digest_of(body)}", headers=headers)
    if endpoint.name == "start_upload":
        return client.post(f"/v2/{name}/blobs/uploads/", headers=headers)
    if endpoint.name == "upload_status":
        session = world.sessions[column]
        return client.get(f"/v2/{name}/blobs/uploads/{session}", headers=headers)
    if endpoint.name in ("append_upload", "finish_upload", "cancel_upload"):
        session = start_upload(setup, name)
        path = f"/v2/{name}/blobs/uploads/{session}"
        data = uuid.uuid4().hex.encode()
        if endpoint.name == "append_upload":
            return client.patch(path, content=data, headers=headers)
        if endpoint.name == "finish_upload":
            return client.put(
                path, params={"digest": digest_of(data)}, content=data, headers=headers
            )
        return client.delete(path, headers=headers)
    if endpoint.name in ("get_blob", "head_blob"):
        return client.request(
            endpoint.method, f"/v2/{name}/blobs/{image['layer']}", headers=headers
        )
    if endpoint.name == "delete_blob":
        digest = push_blob(setup, name, uuid.uuid4().hex.encode())
        return client.delete(f"/v2/{name}/blobs/{digest}", headers=headers)
    if endpoint.name == "referrers":
        return client.get(f"/v2/{name}/referrers/{image['manifest']}", headers=headers)
    raise AssertionError(f"no request defined for {endpoint.name}")


CELLS = [
    pytest.param(subject, endpoint, column, id=f"{subject}-{endpoint.name}-{column}")
    for subject in SUBJECTS
    for endpoint in ENDPOINTS
    for column in COLUMNS
]


@pytest.mark.parametrize(("subject", "endpoint", "column"), CELLS)
def test_matrix_cell(
    server: ServerProcess, world: World, subject: str, endpoint: Endpoint, column: str
) -> None:
    """The cell's request gets the status the access rules demand."""
    headers = (
        world.catalog_headers[subject]
        if endpoint.name == "catalog"
        else world.headers[subject][column]
    )
    with httpx.Client(base_url=server.url) as client, admin_client(server) as setup:
        response = _perform(client, setup, endpoint, world, column, headers)
    expected = expected_status(subject, endpoint, column)
    assert response.status_code == expected, response.text
    if endpoint.name == "catalog" and expected == 200:
        listed = world.repositories[column] in response.json()["repositories"]
        assert listed == (PULL in (rights_of(subject, column) or set()))


def test_matrix_covers_every_route(server: ServerProcess) -> None:
    """Every method of every route has matrix rows or a reason to be elsewhere."""
    routes = server.run_admin(lambda s: _async(build_routes(s)))
    known = {(endpoint.route, endpoint.method) for endpoint in ENDPOINTS}
    known |= set(OTHER_ROUTES)
    for api_endpoint in API_ENDPOINTS:
        known.add((ADMIN_API_PREFIX + api_endpoint.route, api_endpoint.method))
    known |= {(ADMIN_API_PREFIX + path, method) for path, method in API_OTHER_ROUTES}
    missing = []
    for path, route in _flatten(routes):
        for method in sorted(route.methods or ()):
            # Starlette answers HEAD with the GET handler.
            implied = method == "HEAD" and (path, "GET") in known
            if (path, method) not in known and not implied:
                missing.append((path, method))
    assert not missing, f"routes without authorization matrix rows: {missing}"


def _flatten(routes: object, prefix: str = "") -> list[tuple[str, Route]]:
    """Return (full path, route) for every route, inside mounted apps too."""
    assert isinstance(routes, list)
    found: list[tuple[str, Route]] = []
    for route in routes:
        assert isinstance(route, BaseRoute)
        if isinstance(route, Mount) and isinstance(route.app, AdminApiOnFirstUse):
            found += _flatten_api(route.app.build(), prefix + route.path)
            continue
        if isinstance(route, Mount):
            found += _flatten(list(route.routes), prefix + route.path)
            continue
        assert isinstance(route, Route), route
        found.append((prefix + route.path, route))
    return found


def _flatten_api(api: FastAPI, prefix: str) -> list[tuple[str, Route]]:
    """Return the admin API's routes: its own, and those of the routers it
    includes (FastAPI keeps included routers as entries of another type)."""
    own = [route for route in api.routes if isinstance(route, Route)]
    # The one mount serves Swagger UI's static files for /docs, without login.
    mounts = [route for route in api.routes if isinstance(route, Mount)]
    assert [mount.path for mount in mounts] == [DOCS_ASSETS]
    included = len(api.routes) - len(own) - len(mounts)
    assert included == len(ADMIN_API_ROUTERS), "a router is missing from ROUTERS"
    routes = own + [
        route
        for router in ADMIN_API_ROUTERS
        for route in router.routes
        if isinstance(route, Route)
    ]
    return [(prefix + route.path, route) for route in routes]


async def _async(value: object) -> object:
    return value
