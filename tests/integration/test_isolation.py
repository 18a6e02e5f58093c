"""Customer isolation: own namespace only, and no leak of other repositories."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from tests.support.registry import (
    Account,
    Image,
    assert_error,
    digest_of,
    make_image,
    open_account,
    push_image,
    put_manifest,
    stable_headers,
    start_upload,
)
from tests.support.server import ServerProcess, unique


@pytest.fixture(scope="module")
def globex(server: ServerProcess) -> Iterator[tuple[Account, str, Image, str]]:
    """Another customer with a pushed image and an open upload session."""
    account = open_account(server, server.add_customer("globex-" + unique("c")[-8:]))
    repository = account.repository("app")
    image = make_image("globex secret", artifact_type="application/x.sig")
    push_image(account.client, repository, image, "v1")
    location = start_upload(account.client, repository)
    yield account, repository, image, location.rsplit("/", 1)[1]
    account.client.close()


def probe_requests(
    repository: str, image: Image, upload_id: str
) -> list[tuple[str, str, bytes]]:
    """Return (method, path, body) for every endpoint under `repository`."""
    layer = digest_of(image.blobs[1])
    upload = f"/v2/{repository}/blobs/uploads/{upload_id}"
    return [
        ("GET", f"/v2/{repository}/manifests/v1", b""),
        ("HEAD", f"/v2/{repository}/manifests/v1", b""),
        ("GET", f"/v2/{repository}/manifests/{image.digest}", b""),
        ("PUT", f"/v2/{repository}/manifests/v2", image.manifest),
        ("DELETE", f"/v2/{repository}/manifests/{image.digest}", b""),
        ("DELETE", f"/v2/{repository}/manifests/v1", b""),
        ("GET", f"/v2/{repository}/blobs/{layer}", b""),
        ("HEAD", f"/v2/{repository}/blobs/{layer}", b""),
        ("DELETE", f"/v2/{repository}/blobs/{layer}", b""),
        ("POST", f"/v2/{repository}/blobs/uploads/", b""),
        ("POST", f"/v2/{repository}/blobs/uploads/?digest={layer}", image.blobs[1]),
        ("GET", upload, b""),
        ("PATCH", upload, b"appended"),
        ("PUT", f"{upload}?digest={layer}", b""),
        ("DELETE", upload, b""),
        ("GET", f"/v2/{repository}/tags/list", b""),
        ("GET", f"/v2/{repository}/referrers/{image.digest}", b""),
    ]


def response_parts(
    client: httpx.Client, method: str, path: str, body: bytes, name: str
) -> tuple[int, bytes, dict[str, str]]:
    """Send a request; return its status, body and headers with `name` as NAME."""
    response = client.request(method, path, content=body)
    headers = {
        key: value.replace(name, "NAME")
        for key, value in stable_headers(response).items()
    }
    return (
        response.status_code,
        response.content.replace(name.encode(), b"NAME"),
        headers,
    )


def bearer_client(
    server: ServerProcess, account: Account, repository: str
) -> httpx.Client:
    """Return a client with a token asked for pull, push and delete on a repository."""
    token = httpx.get(
        f"{server.url}/token",
        params={
            "service": "moorage",
            "scope": f"repository:{repository}:pull,push,delete",
        },
        auth=(account.login, account.password),
    )
    assert token.status_code == 200
    value = token.json()["token"]
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {value}"}
    )


@pytest.mark.parametrize("credentials", ["basic", "bearer"])
def test_denied_equals_missing(
    server: ServerProcess,
    writer: Account,
    globex: tuple[Account, str, Image, str],
    credentials: str,
) -> None:
    """Responses about another customer's repository equal those about no repository."""
    existing = globex[1]
    missing = f"{existing.split('/')[0]}/{unique('app')}"
    assert len(missing) == len(existing)
    with ExitStack() as stack:
        clients = {}
        for name in (existing, missing):
            if credentials == "basic":
                clients[name] = writer.client
            else:
                clients[name] = stack.enter_context(bearer_client(server, writer, name))
        compare_answers(clients[existing], clients[missing], globex[1:], missing)


def compare_answers(
    seen_client: httpx.Client,
    missing_client: httpx.Client,
    target: tuple[str, Image, str],
    missing: str,
) -> None:
    """Send each probe to the existing and the missing repository and compare."""
    existing, image, upload_id = target
    for method, path, body in probe_requests(existing, image, upload_id):
        seen = response_parts(seen_client, method, path, body, existing)
        other_path = path.replace(existing, missing)
        expected = response_parts(missing_client, method, other_path, body, missing)
        assert seen == expected, f"{method} {path}"
        if "/referrers/" in path:
            # The referrers API never returns 404; an empty index reveals nothing.
            assert seen[0] == 200
            assert json.loads(seen[1])["manifests"] == []
        else:
            assert seen[0] in {403, 404}, f"{method} {path} returned {seen[0]}"


def test_denied_changes_nothing(
    writer: Account, globex: tuple[Account, str, Image, str]
) -> None:
    """After every denied request the other customer's content is unchanged."""
    owner, repository, image, upload_id = globex
    for method, path, body in probe_requests(repository, image, upload_id):
        writer.client.request(method, path, content=body)
    got = owner.client.get(f"/v2/{repository}/manifests/v1")
    assert got.content == image.manifest
    tags = owner.client.get(f"/v2/{repository}/tags/list").json()["tags"]
    assert tags == ["v1"]
    status = owner.client.get(f"/v2/{repository}/blobs/uploads/{upload_id}")
    assert status.status_code == 204
    assert status.headers["range"] == "0-0"


def test_catalog_hides_others(
    writer: Account, globex: tuple[Account, str, Image, str]
) -> None:
    """The catalog of one customer never names another customer's repositories."""
    _, repository, _, _ = globex
    own = writer.repository()
    push_image(writer.client, own, make_image("catalog"), "v1")
    names = writer.client.get("/v2/_catalog", params={"n": "10000"}).json()
    assert own in names["repositories"]
    assert all(name.startswith(f"{writer.customer}/") for name in names["repositories"])
    assert repository not in names["repositories"]


def test_writer_pushes_own(writer: Account) -> None:
    """A writer pushes and pulls in its own namespace."""
    repository = writer.repository()
    image = make_image("own")
    push_image(writer.client, repository, image, "v1")
    assert writer.client.get(f"/v2/{repository}/manifests/v1").content == image.manifest


def test_namespace_root_denied(writer: Account) -> None:
    """A repository named only by the namespace is not the customer's to use."""
    response = writer.client.post(f"/v2/{writer.customer}/blobs/uploads/")
    assert_error(response, 403, "DENIED")


def test_reader_cannot_push(reader: Account, writer: Account) -> None:
    """A reader pulls but gets 403 DENIED on every push."""
    repository = writer.repository()
    image = make_image("reader")
    push_image(writer.client, repository, image, "v1")
    assert reader.client.get(f"/v2/{repository}/manifests/v1").status_code == 200
    post = reader.client.post(f"/v2/{repository}/blobs/uploads/")
    assert_error(post, 403, "DENIED")
    put = put_manifest(reader.client, repository, "v2", image.manifest)
    assert_error(put, 403, "DENIED")


def test_reader_token_lacks_push(server: ServerProcess, reader: Account) -> None:
    """A reader's token for pull,push grants only pull."""
    repository = f"{reader.customer}/app"
    response = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "scope": f"repository:{repository}:pull,push"},
        auth=(reader.login, reader.password),
    )
    assert response.status_code == 200
    client = httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {response.json()['token']}"},
    )
    with client:
        post = client.post(f"/v2/{repository}/blobs/uploads/")
    assert_error(post, 403, "DENIED")


@pytest.mark.parametrize("path", ["/v2/", "/token", "/v2/_catalog"])
def test_wrong_password(server: ServerProcess, writer: Account, path: str) -> None:
    """A wrong password gets 401 everywhere, and so does an unknown login."""
    for login, password in ((writer.login, "wrong-password-123"), ("nobody", "x")):
        response = httpx.get(f"{server.url}{path}", auth=(login, password))
        assert_error(response, 401, "UNAUTHORIZED")


def test_wrong_password_on_repository(writer: Account, server: ServerProcess) -> None:
    """A wrong password on a repository request is 401, never the content."""
    repository = writer.repository()
    push_image(writer.client, repository, make_image("pw"), "v1")
    response = httpx.get(
        f"{server.url}/v2/{repository}/manifests/v1",
        auth=(writer.login, writer.password + "x"),
    )
    assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["www-authenticate"].startswith("Bearer ")


def token_access(server: ServerProcess, account: Account, repository: str) -> object:
    """Return the `access` claim of a token asked for pull and push."""
    response = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "scope": f"repository:{repository}:pull,push"},
        auth=(account.login, account.password),
    )
    assert response.status_code == 200
    payload = response.json()["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims["access"]


def test_token_grants_nothing_elsewhere(
    server: ServerProcess, writer: Account, globex: tuple[Account, str, Image, str]
) -> None:
    """A token asked for another customer's repository grants nothing, as if absent."""
    existing = globex[1]
    missing = f"{existing.split('/')[0]}/{unique('app')}"
    assert token_access(server, writer, existing) == []
    assert token_access(server, writer, missing) == []
    own = writer.repository()
    assert token_access(server, writer, own) == [
        {"type": "repository", "name": own, "actions": ["pull", "push"]}
    ]
