"""Isolation: another customer's existing repository answers byte for byte as a
repository that does not exist, on every endpoint."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from tests.support.identity import (
    OCI_MANIFEST,
    admin_client,
    bearer,
    digest_of,
    get_token,
    manifest_body,
    push_image,
    start_upload,
)
from tests.support.server import ServerProcess, unique

# Headers that differ between any two responses.
VOLATILE = {"x-request-id", "date"}


@dataclass
class Setting:
    existing: str
    missing: dict[str, str]
    image: dict[str, str]
    session: str
    login: tuple[str, str]


@pytest.fixture(scope="module")
def setting(server: ServerProcess) -> Setting:
    """A reader of one customer, and another customer's repository with content."""
    own = server.add_customer()
    other = server.add_customer()
    existing = f"{other}/app"
    with admin_client(server) as client:
        image = push_image(client, existing)
        session = start_upload(client, existing)
    # The missing names are as long as the existing one, so that lengths match.
    missing = {
        "same-namespace": f"{other}/nop",
        "missing-namespace": f"{unique('cust')}/app",
    }
    assert all(len(name) == len(existing) for name in missing.values())
    return Setting(existing, missing, image, session, server.add_user(own, "reader"))


def request_for(
    endpoint: str, name: str, setting: Setting
) -> tuple[str, str, dict[str, str], bytes | None]:
    """Return method, path, extra headers and body of one endpoint's request."""
    image = setting.image
    session = f"/v2/{name}/blobs/uploads/{setting.session}"
    body = manifest_body(image["config_bytes"].encode(), image["layer_bytes"].encode())
    requests = {
        "list_tags": ("GET", f"/v2/{name}/tags/list", {}, None),
        "get_manifest_tag": ("GET", f"/v2/{name}/manifests/latest", {}, None),
        "head_manifest_tag": ("HEAD", f"/v2/{name}/manifests/latest", {}, None),
        "get_manifest_digest": (
            "GET",
            f"/v2/{name}/manifests/{image['manifest']}",
            {},
            None,
        ),
        "put_manifest": (
            "PUT",
            f"/v2/{name}/manifests/leak",
            {"Content-Type": OCI_MANIFEST},
            body,
        ),
        "delete_manifest": (
            "DELETE",
            f"/v2/{name}/manifests/{image['manifest']}",
            {},
            None,
        ),
        "get_blob": ("GET", f"/v2/{name}/blobs/{image['layer']}", {}, None),
        "head_blob": ("HEAD", f"/v2/{name}/blobs/{image['layer']}", {}, None),
        "range_blob": (
            "GET",
            f"/v2/{name}/blobs/{image['layer']}",
            {"Range": "bytes=0-3"},
            None,
        ),
        "delete_blob": ("DELETE", f"/v2/{name}/blobs/{image['layer']}", {}, None),
        "start_upload": ("POST", f"/v2/{name}/blobs/uploads/", {}, None),
        "monolithic_upload": (
            "POST",
            f"/v2/{name}/blobs/uploads/?digest={digest_of(b'x')}",
            {},
            b"x",
        ),
        "upload_status": ("GET", session, {}, None),
        "append_upload": ("PATCH", session, {}, b"data"),
        "finish_upload": ("PUT", f"{session}?digest={digest_of(b'x')}", {}, b"x"),
        "cancel_upload": ("DELETE", session, {}, None),
        "referrers": ("GET", f"/v2/{name}/referrers/{image['manifest']}", {}, None),
    }
    return requests[endpoint]


ENDPOINTS = [
    "list_tags",
    "get_manifest_tag",
    "head_manifest_tag",
    "get_manifest_digest",
    "put_manifest",
    "delete_manifest",
    "get_blob",
    "head_blob",
    "range_blob",
    "delete_blob",
    "start_upload",
    "monolithic_upload",
    "upload_status",
    "append_upload",
    "finish_upload",
    "cancel_upload",
    "referrers",
]


def normalised(
    response: httpx.Response, name: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = sorted(
        (key, value.replace(name, "NAME"))
        for key, value in response.headers.items()
        if key not in VOLATILE
    )
    return (
        response.status_code,
        headers,
        response.content.replace(name.encode(), b"NAME"),
    )


def fetch(
    server: ServerProcess, setting: Setting, endpoint: str, name: str, auth: str
) -> httpx.Response:
    method, path, headers, body = request_for(endpoint, name, setting)
    if auth == "bearer":
        scope = f"repository:{name}:pull,push,delete"
        headers = {**headers, **bearer(get_token(server, *setting.login, scope))}
    with httpx.Client(base_url=server.url) as client:
        return client.request(
            method,
            path,
            headers=headers,
            content=body,
            auth=setting.login if auth == "basic" else None,
        )


@pytest.mark.parametrize("missing", ["same-namespace", "missing-namespace"])
@pytest.mark.parametrize("auth", ["bearer", "basic", "anonymous"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_existing_equals_missing(
    server: ServerProcess, setting: Setting, endpoint: str, auth: str, missing: str
) -> None:
    """Another customer's repository and a missing one give the same response."""
    existing = fetch(server, setting, endpoint, setting.existing, auth)
    absent = fetch(server, setting, endpoint, setting.missing[missing], auth)
    assert existing.status_code in (401, 403, 404, 200)
    assert normalised(existing, setting.existing) == normalised(
        absent, setting.missing[missing]
    )


def test_mount_from_hidden_source(server: ServerProcess, setting: Setting) -> None:
    """A mount from a repository the caller may not pull starts a normal upload,
    as a mount from a missing one does."""
    customer = server.add_customer()
    login = server.add_user(customer, "writer")
    target = f"{customer}/app"
    statuses = []
    for source in (setting.existing, *setting.missing.values()):
        response = httpx.post(
            f"{server.url}/v2/{target}/blobs/uploads/",
            params={"mount": setting.image["layer"], "from": source},
            auth=login,
        )
        statuses.append(
            (response.status_code, "/blobs/uploads/" in response.headers["Location"])
        )
    assert statuses == [(202, True)] * 3
    blob = httpx.head(
        f"{server.url}/v2/{target}/blobs/{setting.image['layer']}", auth=login
    )
    assert blob.status_code == 404


def test_catalog_lists_only_pullable(server: ServerProcess, setting: Setting) -> None:
    """The catalog of a customer's reader lists none of another customer's
    repositories."""
    response = httpx.get(
        f"{server.url}/v2/_catalog", params={"n": 10000}, auth=setting.login
    )
    assert response.status_code == 200
    assert setting.existing not in response.json()["repositories"]
    other_namespace = setting.existing.split("/")[0]
    assert not [
        name
        for name in response.json()["repositories"]
        if name.startswith(other_namespace + "/")
    ]
