"""The customer portal's server side against a real server.

`GET /api/v1/me/repositories`, the list the portal shows: the caller's
repositories with their tags, filtered as the registry's catalog is, and never
another customer's. `/portal`: the page with the registry's address, its own
files only, and headers that forbid inline scripts and framing.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.identity import add_grant, admin_client, push_image
from tests.support.server import (
    ADMIN_LOGIN,
    ADMIN_PASSWORD,
    ServerProcess,
    running_server,
)

TIMEOUT = 30


@dataclass(frozen=True)
class Customers:
    acme: str
    globex: str
    acme_repositories: tuple[str, ...]
    globex_repository: str


def repositories_page(
    server: ServerProcess, auth: tuple[str, str], **params: str | int
) -> dict[str, object]:
    response = httpx.get(
        f"{server.url}/api/v1/me/repositories",
        params=params,
        auth=auth,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    page: dict[str, object] = response.json()
    return page


def names_of(page: dict[str, object]) -> list[str]:
    repositories = page["repositories"]
    assert isinstance(repositories, list)
    return [entry["name"] for entry in repositories]


@pytest.fixture(scope="module")
def customers(server: ServerProcess) -> Customers:
    acme = server.add_customer()
    globex = server.add_customer()
    acme_repositories = (f"{acme}/api", f"{acme}/web")
    globex_repository = f"{globex}/api"
    with admin_client(server) as client:
        push_image(client, acme_repositories[0], "1.0")
        push_image(client, acme_repositories[0], "2.0")
        push_image(client, acme_repositories[1], "latest")
        push_image(client, globex_repository, "1.0")
    return Customers(acme, globex, acme_repositories, globex_repository)


def test_repositories_of_own_customer(
    server: ServerProcess, customers: Customers
) -> None:
    """A reader sees its customer's repositories and their tags, in order."""
    reader = server.add_user(customers.acme, "reader")
    page = repositories_page(server, reader)
    assert names_of(page) == list(customers.acme_repositories)
    assert page["repositories"] == [
        {
            "name": customers.acme_repositories[0],
            "tags": ["1.0", "2.0"],
            "more_tags": False,
        },
        {
            "name": customers.acme_repositories[1],
            "tags": ["latest"],
            "more_tags": False,
        },
    ]
    assert page["next"] is None


def test_repositories_hide_other_customers(
    server: ServerProcess, customers: Customers
) -> None:
    """Neither customer's accounts see the other's repositories, whatever the
    role, even with a `last` that points into the other namespace."""
    for role in ("reader", "owner"):
        globex_user = server.add_user(customers.globex, role)
        page = repositories_page(server, globex_user)
        assert names_of(page) == [customers.globex_repository]
        after = repositories_page(server, globex_user, last=customers.acme)
        assert customers.acme_repositories[0] not in names_of(after)
        assert customers.acme_repositories[1] not in names_of(after)


def test_repositories_follow_grants(
    server: ServerProcess, customers: Customers
) -> None:
    """A grant on another customer's repository makes that one repository
    visible, as it does in the catalog."""
    visitor_customer = server.add_customer()
    visitor = server.add_user(visitor_customer, "reader")
    assert names_of(repositories_page(server, visitor)) == []
    add_grant(server, visitor_customer, customers.acme_repositories[1], "reader")
    names = names_of(repositories_page(server, visitor))
    assert names == [customers.acme_repositories[1]]


def test_repositories_match_catalog(
    server: ServerProcess, customers: Customers
) -> None:
    """The list has the names `/v2/_catalog` returns for the same credentials."""
    reader = server.add_user(customers.acme, "reader")
    catalog = httpx.get(f"{server.url}/v2/_catalog", auth=reader, timeout=TIMEOUT)
    assert catalog.status_code == 200
    assert names_of(repositories_page(server, reader)) == catalog.json()["repositories"]


def test_repositories_of_limited_token(
    server: ServerProcess, customers: Customers
) -> None:
    """A personal access token limited to one repository lists only that one."""
    login, password = server.add_user(customers.acme, "reader")
    created = httpx.post(
        f"{server.url}/api/v1/me/tokens",
        json={"name": "one", "repositories": [customers.acme_repositories[1]]},
        auth=(login, password),
        timeout=TIMEOUT,
    )
    assert created.status_code == 201, created.text
    page = repositories_page(server, (login, created.json()["token"]))
    assert names_of(page) == [customers.acme_repositories[1]]


def test_repositories_paginate(server: ServerProcess, customers: Customers) -> None:
    """`n` limits a page and `next` continues it; pages do not overlap."""
    reader = server.add_user(customers.acme, "reader")
    first = repositories_page(server, reader, n=1)
    assert names_of(first) == [customers.acme_repositories[0]]
    assert first["next"] == customers.acme_repositories[0]
    assert isinstance(first["next"], str)
    second = repositories_page(server, reader, n=1, last=first["next"])
    assert names_of(second) == [customers.acme_repositories[1]]
    assert second["next"] is None


def test_repositories_cap_tags(server: ServerProcess) -> None:
    """A repository with more than 100 tags lists the first 100 and sets
    `more_tags`."""
    customer = server.add_customer()
    name = f"{customer}/many"
    with admin_client(server) as client:
        image = push_image(client, name, "tag-000")
        manifest = client.get(
            f"/v2/{name}/manifests/tag-000",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert manifest.status_code == 200
        for number in range(1, 101):
            response = client.put(
                f"/v2/{name}/manifests/tag-{number:03d}",
                content=manifest.content,
                headers={"Content-Type": manifest.headers["content-type"]},
            )
            assert response.status_code == 201, response.text
    assert image["manifest"]
    reader = server.add_user(customer, "reader")
    (entry,) = repositories_page(server, reader)["repositories"]  # type: ignore[misc]
    assert len(entry["tags"]) == 100
    assert entry["tags"][-1] == "tag-099"
    assert entry["more_tags"] is True


def test_repositories_of_vendor_admin(
    server: ServerProcess, customers: Customers
) -> None:
    """The vendor admin gets every customer's repositories."""
    names = names_of(repositories_page(server, (ADMIN_LOGIN, ADMIN_PASSWORD), n=1000))
    assert set(customers.acme_repositories) <= set(names)
    assert customers.globex_repository in names


def test_repositories_need_login(server: ServerProcess) -> None:
    """Without credentials or with a wrong password the list is 401."""
    response = httpx.get(f"{server.url}/api/v1/me/repositories", timeout=TIMEOUT)
    assert response.status_code == 401
    wrong = httpx.get(
        f"{server.url}/api/v1/me/repositories",
        auth=(ADMIN_LOGIN, uuid.uuid4().hex),
        timeout=TIMEOUT,
    )
    assert wrong.status_code == 401


def test_repositories_reject_bad_page_size(server: ServerProcess) -> None:
    """An `n` outside 1 to 1000 is rejected with 400 and the limit."""
    for value in ("0", "1001", "many"):
        response = httpx.get(
            f"{server.url}/api/v1/me/repositories",
            params={"n": value},
            auth=(ADMIN_LOGIN, ADMIN_PASSWORD),
            timeout=TIMEOUT,
        )
        assert response.status_code == 400, value
        assert response.json()["errors"][0]["code"] == "INVALID_INPUT"


# The portal page and its files


def test_portal_page_security_headers(server: ServerProcess) -> None:
    """The page and its files carry a strict Content-Security-Policy, refuse
    framing, and the page has no inline script or style."""
    for path in ("/portal", "/portal/portal.js", "/portal/portal.css"):
        response = httpx.get(f"{server.url}{path}", timeout=TIMEOUT)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert policy.startswith("default-src 'self';")
        assert "unsafe-inline" not in policy
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(f"{server.url}/portal", timeout=TIMEOUT).text
    assert "<script>" not in page
    assert "<style" not in page
    assert " style=" not in page
    assert re.search(r"<[^>]*\son[a-z]+\s*=", page) is None


def test_portal_files_local_only(server: ServerProcess) -> None:
    """Every script, style and icon the page loads comes from this server."""
    page = httpx.get(f"{server.url}/portal", timeout=TIMEOUT).text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(sources) == [
        "/portal/favicon.svg",
        "/portal/portal.css",
        "/portal/portal.js",
    ]
    script = httpx.get(f"{server.url}/portal/portal.js", timeout=TIMEOUT)
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text


def test_portal_page_shows_request_host(server: ServerProcess) -> None:
    """Without public_url the page names the host the request came to."""
    page = httpx.get(f"{server.url}/portal", timeout=TIMEOUT).text
    assert f'<meta name="moorage-registry" content="{server.url}">' in page
    other = httpx.get(
        f"{server.url}/portal",
        headers={"Host": "registry.example.com:8443"},
        timeout=TIMEOUT,
    ).text
    assert 'content="http://registry.example.com:8443"' in other


def test_portal_page_escapes_bad_host(server: ServerProcess) -> None:
    """A Host header that is not a host name never reaches the page."""
    page = httpx.get(
        f"{server.url}/portal",
        headers={"Host": '"><script>alert(1)</script>'},
        timeout=TIMEOUT,
    ).text
    assert "<script>alert" not in page
    assert "alert(1)" not in page


def test_portal_page_uses_public_url(tmp_path: Path) -> None:
    """With public_url set, the page names it whatever the Host header."""
    public = {"MOORAGE_PUBLIC_URL": "https://registry.example.com/"}
    with running_server(tmp_path / "data", public) as server:
        page = httpx.get(f"{server.url}/portal", timeout=TIMEOUT).text
    assert 'content="https://registry.example.com"' in page


def test_portal_unknown_file_not_found(server: ServerProcess) -> None:
    """A file the portal does not have is 404, not a file from elsewhere."""
    for name in ("missing.js", "..%2F__init__.py", "portal.html"):
        response = httpx.get(f"{server.url}/portal/{name}", timeout=TIMEOUT)
        assert response.status_code == 404, name


def test_repositories_last_with_control_character(
    server: ServerProcess, customers: Customers
) -> None:
    """A `last` with NUL or another control character pages like the catalog
    does on both databases, instead of failing with 500."""
    reader = server.add_user(customers.acme, "reader")
    api, web = customers.acme_repositories
    cases = [(f"{api}\x00", [web]), (f"{customers.acme}/a\x01", [api, web])]
    for last, expected in cases:
        page = repositories_page(server, reader, last=last)
        assert names_of(page) == expected, repr(last)
