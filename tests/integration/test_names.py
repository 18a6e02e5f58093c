"""Repository name and tag grammar, length limits, and the error envelope."""

from __future__ import annotations

import httpx
import pytest

from tests.support.registry import (
    Account,
    assert_error,
    digest_of,
    make_image,
    push_image,
    put_manifest,
)
from tests.support.server import ServerProcess


def padded_name(customer: str, length: int) -> str:
    """Return a repository name in `customer` of exactly `length` characters."""
    prefix = f"{customer}/"
    return prefix + "a" * (length - len(prefix))


@pytest.mark.parametrize(
    "suffix",
    ["app", "a/b/c", "my.app", "my_app", "my__app", "my--app", "0", "a-b.c_d"],
)
def test_valid_names(writer: Account, suffix: str) -> None:
    """Names that follow the grammar accept an upload."""
    response = writer.client.post(f"/v2/{writer.customer}/{suffix}/blobs/uploads/")
    assert response.status_code == 202


@pytest.mark.parametrize(
    "suffix",
    ["App", "-app", "app-", "a..b", "a___b", "a/.b", "a_", "a%20b", "a:b", "a/"],
)
def test_invalid_names(writer: Account, suffix: str) -> None:
    """Names that break the grammar get 400 NAME_INVALID on every endpoint."""
    name = f"{writer.customer}/{suffix}"
    digest = digest_of(b"x")
    requests = [
        ("POST", f"/v2/{name}/blobs/uploads/"),
        ("GET", f"/v2/{name}/blobs/{digest}"),
        ("GET", f"/v2/{name}/manifests/latest"),
        ("PUT", f"/v2/{name}/manifests/latest"),
        ("GET", f"/v2/{name}/tags/list"),
        ("GET", f"/v2/{name}/referrers/{digest}"),
    ]
    for method, path in requests:
        response = writer.client.request(method, path, content=b"{}")
        assert_error(response, 400, "NAME_INVALID")


def test_name_length_limit(writer: Account) -> None:
    """A 255-character name works; 256 characters get 400 NAME_INVALID."""
    longest = padded_name(writer.customer, 255)
    image = make_image("long-name")
    push_image(writer.client, longest, image, "v1")
    assert writer.client.get(f"/v2/{longest}/manifests/v1").status_code == 200
    too_long = padded_name(writer.customer, 256)
    response = writer.client.post(f"/v2/{too_long}/blobs/uploads/")
    assert_error(response, 400, "NAME_INVALID")


@pytest.fixture(scope="module")
def image_repository(writer: Account) -> tuple[str, bytes]:
    image = make_image("tag-grammar")
    repository = writer.repository("tags")
    push_image(writer.client, repository, image)
    return repository, image.manifest


@pytest.mark.parametrize("tag", ["a", "_x", "V1.2.3-rc_1", "0", "t" * 128])
def test_valid_tags(
    writer: Account, image_repository: tuple[str, bytes], tag: str
) -> None:
    """Tags of up to 128 allowed characters can be pushed and pulled."""
    repository, manifest = image_repository
    assert put_manifest(writer.client, repository, tag, manifest).status_code == 201
    got = writer.client.get(f"/v2/{repository}/manifests/{tag}")
    assert got.content == manifest


@pytest.mark.parametrize("tag", [".a", "-a", "a+b", "t" * 129, "a@b"])
def test_invalid_tags(
    writer: Account, image_repository: tuple[str, bytes], tag: str
) -> None:
    """A PUT to a tag outside the grammar gets 400 TAG_INVALID; GET gets 404."""
    repository, manifest = image_repository
    response = put_manifest(writer.client, repository, tag, manifest)
    assert_error(response, 400, "TAG_INVALID")
    get = writer.client.get(f"/v2/{repository}/manifests/{tag}")
    assert_error(get, 404, "MANIFEST_UNKNOWN")


def test_invalid_digest_reference(
    writer: Account, image_repository: tuple[str, bytes]
) -> None:
    """A malformed digest as manifest reference gets 400 DIGEST_INVALID."""
    repository, _ = image_repository
    response = writer.client.get(f"/v2/{repository}/manifests/sha256:totallywrong")
    assert_error(response, 400, "DIGEST_INVALID")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/nothing-here", 404, "NOT_FOUND"),
        ("GET", "/v3/", 404, "NOT_FOUND"),
        ("DELETE", "/v2/", 405, "UNSUPPORTED"),
        ("POST", "/v2/acme/app/tags/list", 405, "UNSUPPORTED"),
    ],
)
def test_error_envelope_routing(
    writer: Account, method: str, path: str, status: int, code: str
) -> None:
    """Unknown paths and methods still answer with the JSON error envelope."""
    response = writer.client.request(method, path)
    assert_error(response, status, code)


def test_error_envelope_anonymous(server: ServerProcess) -> None:
    """An anonymous repository request gets 401 UNAUTHORIZED with a challenge."""
    response = httpx.get(f"{server.url}/v2/acme/app/manifests/latest")
    assert_error(response, 401, "UNAUTHORIZED")
    challenge = response.headers["www-authenticate"]
    assert 'scope="repository:acme/app:pull"' in challenge
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
