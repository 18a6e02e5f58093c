"""Personal access tokens limited to repository patterns: Basic logins, the
token service, bearer tokens, refresh tokens, the catalog and blob mounts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest

from moorage import admin
from moorage.errors import InvalidInputError
from tests.support.cli import Cli
from tests.support.identity import (
    add_grant,
    admin_client,
    bearer,
    get_token,
    push_blob,
    push_image,
)
from tests.support.server import ADMIN_LOGIN, ServerProcess, unique


@dataclass
class Setup:
    customer: str
    product: str
    login: str
    password: str


@pytest.fixture(scope="module")
def setup(server: ServerProcess) -> Setup:
    """A writer of a customer with app-1, app-2 and other in its namespace, and
    a reader grant on a vendor product."""
    customer = server.add_customer()
    product = f"{unique('prod')}/tool"
    with admin_client(server) as client:
        for name in ("app-1", "app-2", "other"):
            push_image(client, f"{customer}/{name}")
        push_image(client, product)
    add_grant(server, customer, product, "reader")
    login, password = server.add_user(customer, "writer")
    return Setup(customer, product, login, password)


def personal_token(
    server: ServerProcess,
    customer: str,
    login: str,
    role: str,
    repositories: list[str] | None,
) -> str:
    until = datetime.now(UTC) + timedelta(days=1)
    created = server.run_admin(
        lambda s: admin.add_personal_token(
            s.identity, customer, login, "ci", role, until, repositories
        )
    )
    return created.token


@pytest.fixture(scope="module")
def app_token(server: ServerProcess, setup: Setup) -> str:
    """A writer token limited to the customer's app-* repositories."""
    pattern = f"{setup.customer}/app-*"
    return personal_token(server, setup.customer, setup.login, "writer", [pattern])


@pytest.fixture
def client(
    server: ServerProcess, setup: Setup, app_token: str
) -> Iterator[httpx.Client]:
    """A client that sends the app-* token as Basic credentials."""
    with httpx.Client(base_url=server.url, auth=(setup.login, app_token)) as basic:
        yield basic


def access_of(token: dict[str, object]) -> list[dict[str, object]]:
    claims = jwt.decode(str(token["token"]), options={"verify_signature": False})
    return list(claims["access"])


def test_basic_inside_pattern(client: httpx.Client, setup: Setup) -> None:
    """Inside its pattern the token pulls and pushes as its role allows."""
    assert client.get(f"/v2/{setup.customer}/app-1/tags/list").status_code == 200
    upload = client.post(f"/v2/{setup.customer}/app-2/blobs/uploads/")
    assert upload.status_code == 202


def test_basic_outside_pattern_hidden(
    server: ServerProcess, client: httpx.Client, setup: Setup
) -> None:
    """Outside its pattern, a repository the user may use responds as missing."""
    for name in (f"{setup.customer}/other", setup.product):
        response = client.get(f"/v2/{name}/tags/list")
        assert response.status_code == 404
        assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    pushed = client.post(f"/v2/{setup.customer}/other/blobs/uploads/")
    assert pushed.status_code == 403
    with httpx.Client(
        base_url=server.url, auth=(setup.login, setup.password)
    ) as password:
        assert password.get(f"/v2/{setup.customer}/other/tags/list").status_code == 200


def test_token_service_outside_pattern_empty(
    server: ServerProcess, setup: Setup, app_token: str
) -> None:
    """/token grants nothing outside the pattern: an empty grant, not an error."""
    outside = f"repository:{setup.customer}/other:pull,push"
    token = get_token(server, setup.login, app_token, outside)
    assert access_of(token) == []
    assert token["scope"] == ""
    product = get_token(
        server, setup.login, app_token, f"repository:{setup.product}:pull"
    )
    assert access_of(product) == []


def test_token_service_mixed_scopes(
    server: ServerProcess, setup: Setup, app_token: str
) -> None:
    """Of several scopes, only those inside the pattern are granted."""
    inside = f"{setup.customer}/app-1"
    token = get_token(
        server,
        setup.login,
        app_token,
        f"repository:{inside}:pull,push",
        f"repository:{setup.customer}/other:pull",
        "registry:catalog:*",
    )
    granted = {str(entry["name"]): entry["actions"] for entry in access_of(token)}
    assert set(granted) == {inside, "catalog"}
    assert sorted(granted[inside]) == ["pull", "push"]  # type: ignore[arg-type]


def test_bearer_outside_pattern_hidden(
    server: ServerProcess, setup: Setup, app_token: str
) -> None:
    """A bearer token issued through the limited token opens nothing outside."""
    token = get_token(
        server,
        setup.login,
        app_token,
        f"repository:{setup.customer}/app-1:pull",
        f"repository:{setup.customer}/other:pull",
    )
    inside = httpx.get(
        f"{server.url}/v2/{setup.customer}/app-1/tags/list", headers=bearer(token)
    )
    assert inside.status_code == 200
    outside = httpx.get(
        f"{server.url}/v2/{setup.customer}/other/tags/list", headers=bearer(token)
    )
    assert outside.status_code == 404


def test_refresh_keeps_pattern(
    server: ServerProcess, setup: Setup, app_token: str
) -> None:
    """A refresh token from the limited token stays limited."""
    response = httpx.get(
        f"{server.url}/token",
        params={"offline_token": "true"},
        auth=(setup.login, app_token),
    )
    refresh = response.json()["refresh_token"]
    renewed = httpx.post(
        f"{server.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "scope": f"repository:{setup.customer}/other:pull "
            f"repository:{setup.customer}/app-2:pull",
        },
    )
    assert renewed.status_code == 200
    names = [entry["name"] for entry in access_of(renewed.json())]
    assert names == [f"{setup.customer}/app-2"]


def test_catalog_filtered_by_pattern(
    server: ServerProcess, client: httpx.Client, setup: Setup, app_token: str
) -> None:
    """The catalog lists only what both the user and the token may pull."""
    expected = [f"{setup.customer}/app-1", f"{setup.customer}/app-2"]
    assert client.get("/v2/_catalog").json()["repositories"] == expected
    token = get_token(server, setup.login, app_token, "registry:catalog:*")
    listed = httpx.get(f"{server.url}/v2/_catalog", headers=bearer(token))
    assert listed.json()["repositories"] == expected


def test_pattern_never_widens_rights(server: ServerProcess, setup: Setup) -> None:
    """A pattern naming repositories the user may not use opens none of them."""
    other = server.add_customer()
    with admin_client(server) as vendor:
        push_image(vendor, f"{other}/app")
    token = personal_token(
        server, setup.customer, setup.login, "writer", [f"{other}/*", "*"]
    )
    with httpx.Client(base_url=server.url, auth=(setup.login, token)) as client:
        assert client.get(f"/v2/{other}/app/tags/list").status_code == 404
        listed = client.get("/v2/_catalog").json()["repositories"]
    assert f"{other}/app" not in listed
    assert f"{setup.customer}/other" in listed
    asked = f"repository:{other}/app:pull"
    assert access_of(get_token(server, setup.login, token, asked)) == []


def test_pattern_and_role_intersect(server: ServerProcess, setup: Setup) -> None:
    """A reader token on a pattern pulls there but pushes nowhere."""
    token = personal_token(
        server, setup.customer, setup.login, "reader", [setup.customer]
    )
    with httpx.Client(base_url=server.url, auth=(setup.login, token)) as client:
        assert client.get(f"/v2/{setup.customer}/other/tags/list").status_code == 200
        push = client.post(f"/v2/{setup.customer}/other/blobs/uploads/")
        assert push.status_code == 403
        assert client.get(f"/v2/{setup.product}/tags/list").status_code == 404


def test_grant_pattern_inside_token(server: ServerProcess, setup: Setup) -> None:
    """A token limited to a granted product pulls it and nothing of its own."""
    token = personal_token(
        server, setup.customer, setup.login, "writer", [setup.product]
    )
    with httpx.Client(base_url=server.url, auth=(setup.login, token)) as client:
        assert client.get(f"/v2/{setup.product}/tags/list").status_code == 200
        own = client.get(f"/v2/{setup.customer}/app-1/tags/list")
        assert own.status_code == 404
        assert client.get("/v2/_catalog").json()["repositories"] == [setup.product]


def test_mount_from_outside_pattern(
    server: ServerProcess, client: httpx.Client, setup: Setup
) -> None:
    """A mount from a repository outside the pattern starts an upload instead."""
    data = f"mount source {unique('blob')}".encode()
    source = f"{setup.customer}/other"
    target = f"{setup.customer}/app-2"
    with admin_client(server) as vendor:
        digest = push_blob(vendor, source, data)
    response = client.post(
        f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source}
    )
    assert response.status_code == 202
    assert client.head(f"/v2/{target}/blobs/{digest}").status_code == 404
    with httpx.Client(
        base_url=server.url, auth=(setup.login, setup.password)
    ) as password:
        mounted = password.post(
            f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source}
        )
    assert mounted.status_code == 201


def test_vendor_token_catalog_limited(server: ServerProcess, setup: Setup) -> None:
    """A vendor admin's limited token lists only matching repositories."""
    token = personal_token(server, "-", ADMIN_LOGIN, "reader", [setup.product])
    with httpx.Client(base_url=server.url, auth=(ADMIN_LOGIN, token)) as client:
        assert client.get("/v2/_catalog").json()["repositories"] == [setup.product]
        hidden = client.get(f"/v2/{setup.customer}/app-1/tags/list")
        assert hidden.status_code == 404


@pytest.mark.parametrize(
    "patterns", [[], ["Acme/App"], ["acme/app?"], ["acme app"], ["/acme"]]
)
def test_invalid_patterns_rejected(
    server: ServerProcess, setup: Setup, patterns: list[str]
) -> None:
    """An empty list or a malformed pattern is rejected at creation."""
    with pytest.raises(InvalidInputError):
        personal_token(server, setup.customer, setup.login, "reader", patterns)


def test_cli_token_with_repositories(server: ServerProcess, setup: Setup) -> None:
    """token add takes --repository several times; token list shows them."""
    cli = Cli(server.data_dir, server.database_url)
    first = f"{setup.customer}/app-*"
    second = f"{setup.customer}/other"
    output = cli.ok(
        "token",
        "add",
        setup.customer,
        setup.login,
        "--name",
        "limited",
        "--repository",
        first,
        "--repository",
        second,
    )
    token = output.strip().splitlines()[-1]
    listing = cli.ok("token", "list", setup.customer, setup.login)
    # The table folds long patterns over several lines; join the column back.
    column = "".join(
        line.split("│")[4].strip()
        for line in listing.splitlines()
        if line.count("│") == 8
    )
    assert first in column
    assert second in column
    with httpx.Client(base_url=server.url, auth=(setup.login, token)) as client:
        names = client.get("/v2/_catalog").json()["repositories"]
    assert names == [f"{setup.customer}/app-1", f"{setup.customer}/app-2", second]
    rejected = cli.run(
        "token", "add", setup.customer, setup.login, "--repository", "Bad Pattern"
    )
    assert rejected.returncode == 2
    assert rejected.stderr.splitlines() == [
        "error: --repository: invalid pattern 'Bad Pattern': use a namespace "
        "(products), a repository (products/app) or a glob (products/*)"
    ]


def test_owner_tokens_manage_nothing(server: ServerProcess) -> None:
    """An owner's tokens, limited to repository patterns or not, get no admin
    API rights, while the owner's password keeps them."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "owner")
    limited = personal_token(server, customer, login, "maintainer", [f"{customer}/app"])
    unlimited = personal_token(server, customer, login, "maintainer", None)
    users = f"{server.url}/api/v1/customers/{customer}/users"
    assert httpx.get(users, auth=(login, password)).status_code == 200
    assert httpx.get(users, auth=(login, unlimited)).status_code == 403
    assert httpx.get(users, auth=(login, limited)).status_code == 403
