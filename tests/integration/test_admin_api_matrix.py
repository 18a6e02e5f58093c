"""The admin API's authorization matrix: every subject x every admin API route x
three customers (the subject's own, another existing one, a missing one).

test_authorization_matrix.test_matrix_covers_every_route walks the mounted
admin API as well, so a new API route without rows in API_ENDPOINTS (or a
reason in API_OTHER_ROUTES) fails the suite. Expected statuses follow the rules
in docs/access-control.md:

- no credentials, a disabled account: 401;
- vendor admin: every change on every existing customer, 404 for a missing one;
- vendor auditor: reads like the admin, 403 for every change;
- a customer's owner (a user or a robot): everything on its own customer, 404
  on others, as for a missing customer;
- any other account of the customer, or an owner's personal access token: 403
  on its own customer, 404 on others;
- `/me` for every login; personal access tokens for users only (403 for a
  robot), created only with a password (403 with a token).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from moorage import admin
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique

READ, CHANGE, LOGIN, USER, PASSWORD = "read", "change", "login", "user", "password"
COLUMNS = ("own", "other", "missing")
SUBJECTS = (
    "none",
    "reader",
    "writer",
    "maintainer",
    "owner",
    "owner-robot",
    "owner-token",
    "vendor-admin",
    "auditor",
    "disabled",
)
CUSTOMER = "/customers/{customer}"


@dataclass(frozen=True)
class ApiEndpoint:
    name: str
    method: str
    route: str
    # read or change on the customer; for /me: login, user or password (a
    # user that logged in with its password, not a token).
    needs: str
    success: int


API_ENDPOINTS = (
    ApiEndpoint("list_customers", "GET", "/customers", LOGIN, 200),
    ApiEndpoint("show_customer", "GET", CUSTOMER, READ, 200),
    ApiEndpoint("list_users", "GET", f"{CUSTOMER}/users", READ, 200),
    ApiEndpoint("add_user", "POST", f"{CUSTOMER}/users", CHANGE, 201),
    ApiEndpoint("show_user", "GET", f"{CUSTOMER}/users/{{login}}", READ, 200),
    ApiEndpoint("remove_user", "DELETE", f"{CUSTOMER}/users/{{login}}", CHANGE, 204),
    ApiEndpoint(
        "disable_user", "POST", f"{CUSTOMER}/users/{{login}}/disable", CHANGE, 204
    ),
    ApiEndpoint(
        "enable_user", "POST", f"{CUSTOMER}/users/{{login}}/enable", CHANGE, 204
    ),
    ApiEndpoint("user_role", "PUT", f"{CUSTOMER}/users/{{login}}/role", CHANGE, 200),
    ApiEndpoint(
        "reset_password", "POST", f"{CUSTOMER}/users/{{login}}/password", CHANGE, 200
    ),
    ApiEndpoint("list_robots", "GET", f"{CUSTOMER}/robots", READ, 200),
    ApiEndpoint("add_robot", "POST", f"{CUSTOMER}/robots", CHANGE, 201),
    ApiEndpoint("show_robot", "GET", f"{CUSTOMER}/robots/{{name}}", READ, 200),
    ApiEndpoint("remove_robot", "DELETE", f"{CUSTOMER}/robots/{{name}}", CHANGE, 204),
    ApiEndpoint(
        "disable_robot", "POST", f"{CUSTOMER}/robots/{{name}}/disable", CHANGE, 204
    ),
    ApiEndpoint(
        "enable_robot", "POST", f"{CUSTOMER}/robots/{{name}}/enable", CHANGE, 204
    ),
    ApiEndpoint("robot_role", "PUT", f"{CUSTOMER}/robots/{{name}}/role", CHANGE, 200),
    ApiEndpoint(
        "rotate_robot", "POST", f"{CUSTOMER}/robots/{{name}}/secret", CHANGE, 200
    ),
    ApiEndpoint("list_grants", "GET", f"{CUSTOMER}/grants", READ, 200),
    ApiEndpoint("add_grant", "POST", f"{CUSTOMER}/grants", CHANGE, 201),
    ApiEndpoint(
        "remove_grant", "DELETE", f"{CUSTOMER}/grants/{{grant_id}}", CHANGE, 204
    ),
    ApiEndpoint("show_me", "GET", "/me", LOGIN, 200),
    ApiEndpoint("list_repositories", "GET", "/me/repositories", LOGIN, 200),
    ApiEndpoint("list_tokens", "GET", "/me/tokens", USER, 200),
    ApiEndpoint("add_token", "POST", "/me/tokens", PASSWORD, 201),
    ApiEndpoint("revoke_token", "DELETE", "/me/tokens/{token_id}", USER, 204),
)
# Admin API routes outside the matrix, and why.
API_OTHER_ROUTES = {
    ("/openapi.json", "GET"): "the OpenAPI document, public (test_admin_api.py)",
    ("/docs", "GET"): "the OpenAPI browser page, public (test_admin_api.py)",
}


def expected_status(subject: str, endpoint: ApiEndpoint, column: str) -> int:
    if subject in ("none", "disabled"):
        return 401
    if endpoint.needs in (LOGIN, USER, PASSWORD):
        return _me_status(subject, endpoint)
    if subject == "vendor-admin":
        return 404 if column == "missing" else endpoint.success
    if subject == "auditor":
        if endpoint.needs == CHANGE:
            return 403
        return 404 if column == "missing" else endpoint.success
    if column != "own":
        return 404
    owner = subject in ("owner", "owner-robot")
    return endpoint.success if owner else 403


def _me_status(subject: str, endpoint: ApiEndpoint) -> int:
    if endpoint.needs == LOGIN:
        return endpoint.success
    if subject == "owner-robot":
        return 403
    if endpoint.needs == PASSWORD and subject == "owner-token":
        return 403
    return endpoint.success


@dataclass
class Subject:
    auth: tuple[str, str] | None
    # The user's password, for preparing its personal access tokens.
    password_auth: tuple[str, str] | None = None


@dataclass
class World:
    customers: dict[str, str]
    subjects: dict[str, Subject] = field(default_factory=dict)


def _api(server: ServerProcess, auth: tuple[str, str] | None) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/api/v1", auth=auth, timeout=30)


def _created(response: httpx.Response) -> dict[str, object]:
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def _new_user(setup: httpx.Client, customer: str, role: str) -> tuple[str, str]:
    login = unique("user")
    body = _created(
        setup.post(f"/customers/{customer}/users", json={"login": login, "role": role})
    )
    return login, str(body["password"])


def _new_token(server: ServerProcess, auth: tuple[str, str], role: str) -> str:
    with _api(server, auth) as client:
        body = _created(client.post("/me/tokens", json={"name": "t", "role": role}))
    return str(body["token"])


def _subject(
    server: ServerProcess, setup: httpx.Client, own: str, name: str
) -> Subject:
    if name == "none":
        return Subject(None)
    if name == "vendor-admin":
        return Subject((ADMIN_LOGIN, ADMIN_PASSWORD), (ADMIN_LOGIN, ADMIN_PASSWORD))
    if name == "auditor":
        # Vendor users are made by the command line only.
        login = unique("auditor")
        created = server.run_admin(
            lambda s: admin.add_vendor_user(s.identity, login, "auditor")
        )
        assert created.password is not None
        return Subject((login, created.password), (login, created.password))
    if name == "owner-robot":
        body = _created(
            setup.post(
                f"/customers/{own}/robots",
                json={"name": uuid.uuid4().hex[:8], "role": "owner"},
            )
        )
        return Subject((str(body["login"]), str(body["secret"])))
    if name == "owner-token":
        login, password = _new_user(setup, own, "owner")
        token = _new_token(server, (login, password), "maintainer")
        return Subject((login, token), (login, password))
    role = "owner" if name == "disabled" else name
    login, password = _new_user(setup, own, role)
    if name == "disabled":
        response = setup.post(f"/customers/{own}/users/{login}/disable")
        assert response.status_code == 204, response.text
    return Subject((login, password), (login, password))


@pytest.fixture(scope="module")
def world(server: ServerProcess) -> World:
    customers = {
        "own": server.add_customer(),
        "other": server.add_customer(),
        "missing": unique("missing"),
    }
    world = World(customers)
    with _api(server, (ADMIN_LOGIN, ADMIN_PASSWORD)) as setup:
        for name in SUBJECTS:
            world.subjects[name] = _subject(server, setup, customers["own"], name)
    return world


def _target(
    setup: httpx.Client, endpoint: ApiEndpoint, customer: str
) -> dict[str, str]:
    """Create what the cell acts on (as the vendor admin); return path values."""
    values = {"customer": customer, "login": unique("target"), "name": "nobody"}
    values["grant_id"] = "999999999"
    exists = not customer.startswith("missing-")
    if "{login}" in endpoint.route and exists:
        values["login"] = _new_user(setup, customer, "reader")[0]
    if "{name}" in endpoint.route and exists:
        name = uuid.uuid4().hex[:8]
        _created(
            setup.post(
                f"/customers/{customer}/robots", json={"name": name, "role": "reader"}
            )
        )
        values["name"] = name
    if "{grant_id}" in endpoint.route and exists:
        body = {"pattern": f"{customer}/app-{uuid.uuid4().hex[:6]}", "role": "reader"}
        grant = _created(setup.post(f"/customers/{customer}/grants", json=body))
        values["grant_id"] = str(grant["id"])
    return values


def _body(endpoint: ApiEndpoint, customer: str) -> dict[str, object] | None:
    if endpoint.name == "add_user":
        return {"login": unique("added"), "role": "reader"}
    if endpoint.name == "add_robot":
        return {"name": uuid.uuid4().hex[:8], "role": "reader"}
    if endpoint.name == "add_grant":
        return {"pattern": f"{customer}/granted-*", "role": "reader"}
    if endpoint.name in ("user_role", "robot_role"):
        return {"role": "writer"}
    if endpoint.name == "add_token":
        return {"name": "matrix", "role": "reader"}
    return None


def _perform(
    server: ServerProcess,
    world: World,
    subject: str,
    endpoint: ApiEndpoint,
    column: str,
) -> httpx.Response:
    customer = world.customers[column]
    auth = world.subjects[subject].auth
    with _api(server, (ADMIN_LOGIN, ADMIN_PASSWORD)) as setup:
        values = _target(setup, endpoint, customer)
    password_auth = world.subjects[subject].password_auth
    if endpoint.name == "revoke_token":
        values["token_id"] = "999999999"
        if password_auth is not None and subject != "disabled":
            with _api(server, password_auth) as owner:
                created = _created(owner.post("/me/tokens", json={"name": "gone"}))
            values["token_id"] = str(created["id"])
    path = endpoint.route.format(**values)
    with _api(server, auth) as client:
        return client.request(endpoint.method, path, json=_body(endpoint, customer))


CELLS = [
    pytest.param(subject, endpoint, column, id=f"{subject}-{endpoint.name}-{column}")
    for subject in SUBJECTS
    for endpoint in API_ENDPOINTS
    for column in (COLUMNS if endpoint.route.startswith(CUSTOMER) else ("own",))
]


@pytest.mark.parametrize(("subject", "endpoint", "column"), CELLS)
def test_api_matrix_cell(
    server: ServerProcess,
    world: World,
    subject: str,
    endpoint: ApiEndpoint,
    column: str,
) -> None:
    """The cell's request gets the status the access rules demand."""
    response = _perform(server, world, subject, endpoint, column)
    expected = expected_status(subject, endpoint, column)
    assert response.status_code == expected, response.text
    if expected >= 400:
        assert response.json()["errors"][0]["code"]


def test_hidden_customer_answers_as_missing(
    server: ServerProcess, world: World
) -> None:
    """Another customer's 404 is byte for byte a missing customer's, per route."""
    auth = world.subjects["owner"].auth
    other, missing = world.customers["other"], world.customers["missing"]
    with _api(server, auth) as client:
        for endpoint in API_ENDPOINTS:
            if not endpoint.route.startswith(CUSTOMER):
                continue
            values = {"login": "x", "name": "x", "grant_id": "1"}
            bodies = []
            for customer in (other, missing):
                path = endpoint.route.format(customer=customer, **values)
                response = client.request(
                    endpoint.method, path, json=_body(endpoint, customer)
                )
                assert response.status_code == 404, response.text
                bodies.append(response.content.replace(customer.encode(), b"C"))
            assert bodies[0] == bodies[1], endpoint.name
