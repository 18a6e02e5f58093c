"""Accounts, grants and registry content for access-control tests.

Every helper works on a running test server: accounts through the same admin
functions the command line uses, content through the registry HTTP API.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Table, update

from moorage import admin
from moorage.services import Services
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add_robot(
    server: ServerProcess, customer: str, role: str, name: str | None = None
) -> tuple[str, str]:
    """Create a robot; return (login, secret)."""
    name = name or uuid.uuid4().hex[:8]
    created = server.run_admin(
        lambda s: admin.add_robot(s.identity, customer, name, role)
    )
    assert created.password is not None
    return created.login, created.password


def add_grant(
    server: ServerProcess,
    customer: str,
    pattern: str,
    role: str,
    *,
    until: datetime | None = None,
    account: str | None = None,
) -> int:
    return server.run_admin(
        lambda s: admin.add_grant(s.identity, customer, pattern, role, until, account)
    )


def past() -> datetime:
    return datetime.now(UTC) - timedelta(days=1)


def end_in_past(server: ServerProcess, table: Table, column: str, **where: Any) -> None:
    """Set `column` of the rows of `table` that match `where` to yesterday, as
    if that end date had passed: the admin functions refuse an end in the past.
    Database triggers bump the identity revision, so the server sees it."""

    async def action(services: Services) -> None:
        async with services.engine.begin() as connection:
            await connection.execute(
                update(table)
                .where(*(table.c[name] == value for name, value in where.items()))
                .values({column: past()})
            )

    server.run_admin(action)


def basic_header(login: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{login}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def get_token(
    server: ServerProcess, login: str, password: str, *scopes: str
) -> dict[str, object]:
    """Fetch a token from GET /token; raise when the request fails."""
    response = httpx.get(
        f"{server.url}/token",
        params=[("service", "moorage"), *(("scope", scope) for scope in scopes)],
        auth=(login, password),
    )
    response.raise_for_status()
    return dict(response.json())


def bearer(token: dict[str, object]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['token']}"}


def admin_client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD))


def push_blob(client: httpx.Client, name: str, data: bytes) -> str:
    """Upload a blob in one POST; return its digest."""
    digest = digest_of(data)
    response = client.post(
        f"/v2/{name}/blobs/uploads/",
        params={"digest": digest},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    return digest


def manifest_body(config: bytes, layer: bytes, note: str = "") -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": digest_of(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}
        ],
        "annotations": {"note": note or uuid.uuid4().hex},
    }
    return json.dumps(document, sort_keys=True).encode()


def push_image(client: httpx.Client, name: str, tag: str = "latest") -> dict[str, str]:
    """Push a one-layer image; return the digests of config, layer and manifest."""
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = f"layer of {name} {uuid.uuid4().hex}".encode()
    push_blob(client, name, config)
    push_blob(client, name, layer)
    body = manifest_body(config, layer)
    response = client.put(
        f"/v2/{name}/manifests/{tag}",
        content=body,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert response.status_code == 201, response.text
    return {
        "config": digest_of(config),
        "layer": digest_of(layer),
        "manifest": digest_of(body),
        "config_bytes": config.decode(),
        "layer_bytes": layer.decode(),
    }


def start_upload(client: httpx.Client, name: str) -> str:
    response = client.post(f"/v2/{name}/blobs/uploads/")
    assert response.status_code == 202, response.text
    return response.headers["Docker-Upload-UUID"]
