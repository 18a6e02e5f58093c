"""Drive a running registry over HTTP in tests: accounts, blobs, manifests, checks.

Everything here goes through the public API with httpx, except the storage and
database checks of `assert_storage_consistent`, which read the server's data
directory and metadata database directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from moorage.db.registry_store import RegistryStore
from tests.support.server import ServerProcess, unique

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
EMPTY_JSON = b"{}"

# Headers that differ between any two responses, whatever they answer.
VOLATILE_HEADERS = frozenset({"date", "x-request-id"})


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": digest_of(data),
        "size": len(data),
        **extra,
    }


def to_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass
class Account:
    """A customer user with an HTTP client that sends its Basic credentials."""

    customer: str
    login: str
    password: str
    client: httpx.Client

    def repository(self, prefix: str = "app") -> str:
        """Return a new repository name in the customer's namespace."""
        return f"{self.customer}/{unique(prefix)}"


def open_account(server: ServerProcess, customer: str, role: str = "writer") -> Account:
    """Create a user of `customer` with `role`, and a client logged in as it."""
    login, password = server.add_user(customer, role)
    client = httpx.Client(base_url=server.url, auth=(login, password), timeout=60)
    return Account(customer, login, password, client)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Check the spec's JSON error envelope and return its first error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"errors"}
    assert body["errors"], "the errors list is empty"
    for entry in body["errors"]:
        assert isinstance(entry["code"], str)
        assert isinstance(entry["message"], str)
        assert set(entry) <= {"code", "message", "detail"}
    first: dict[str, Any] = body["errors"][0]
    assert first["code"] == code, body
    return first


def stable_headers(response: httpx.Response) -> dict[str, str]:
    """Return the headers that must not differ between two equal answers."""
    return {
        key: value
        for key, value in response.headers.items()
        if key not in VOLATILE_HEADERS
    }


def push_blob(
    client: httpx.Client, repository: str, data: bytes, algorithm: str = "sha256"
) -> str:
    """Push `data` with a monolithic POST and return its digest."""
    digest = digest_of(data, algorithm)
    response = client.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"digest": digest},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    return digest


def start_upload(client: httpx.Client, repository: str) -> str:
    """Open an upload session and return its Location path."""
    response = client.post(f"/v2/{repository}/blobs/uploads/")
    assert response.status_code == 202, response.text
    return response.headers["location"]


def put_manifest(
    client: httpx.Client,
    repository: str,
    reference: str,
    content: bytes,
    media_type: str = OCI_MANIFEST,
) -> httpx.Response:
    return client.put(
        f"/v2/{repository}/manifests/{reference}",
        content=content,
        headers={"Content-Type": media_type},
    )


@dataclass
class Image:
    """A manifest with its config and layers, as bytes, for pushing."""

    manifest: bytes
    media_type: str
    blobs: list[bytes] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return descriptor(self.media_type, self.manifest, **extra)


def make_image(
    seed: str,
    *,
    media_type: str = OCI_MANIFEST,
    artifact_type: str | None = None,
    subject: Image | None = None,
    annotations: dict[str, str] | None = None,
    layer_count: int = 1,
) -> Image:
    """Build a small image manifest whose config and layers depend on `seed`."""
    docker = media_type == DOCKER_MANIFEST
    config = to_json({"architecture": "amd64", "os": "linux", "seed": seed})
    layers = [f"layer {index} of {seed}".encode() for index in range(layer_count)]
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type is not None:
        document["artifactType"] = artifact_type
    document["config"] = descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config)
    layer_type = DOCKER_LAYER if docker else OCI_LAYER
    document["layers"] = [descriptor(layer_type, layer) for layer in layers]
    if subject is not None:
        document["subject"] = subject.descriptor()
    if annotations is not None:
        document["annotations"] = annotations
    return Image(to_json(document), media_type, [config, *layers])


def make_index(children: list[Image], media_type: str = OCI_INDEX) -> Image:
    """Build an image index (or Docker manifest list) over `children`."""
    entries = [
        child.descriptor(platform={"architecture": f"arch{index}", "os": "linux"})
        for index, child in enumerate(children)
    ]
    document = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    return Image(to_json(document), media_type)


def push_image(
    client: httpx.Client, repository: str, image: Image, reference: str | None = None
) -> httpx.Response:
    """Push the image's blobs, then its manifest by `reference` (default: digest)."""
    for blob in image.blobs:
        push_blob(client, repository, blob)
    response = put_manifest(
        client, repository, reference or image.digest, image.manifest, image.media_type
    )
    assert response.status_code == 201, response.text
    return response


def stored_blob_files(server: ServerProcess) -> Iterator[Path]:
    root = server.data_dir / "storage" / "blobs"
    if root.exists():
        yield from (path for path in root.rglob("*") if path.is_file())


def upload_dir(server: ServerProcess, upload_id: str) -> Path:
    return server.data_dir / "storage" / "uploads" / upload_id


def assert_storage_consistent(server: ServerProcess) -> None:
    """Check that every committed blob file is recorded and has its digest's bytes."""
    files = list(stored_blob_files(server))
    digests = [f"{path.parent.parent.name}:{path.name}" for path in files]

    async def recorded(services: Any) -> list[bool]:
        store = RegistryStore(services.engine)
        return [await store.blob_exists(digest) for digest in digests]

    known = server.run_admin(recorded) if digests else []
    for path, digest, is_known in zip(files, digests, known, strict=True):
        assert not path.name.endswith(".tmp"), f"temporary file left: {path}"
        assert is_known, f"{digest} is stored but has no database row"
        algorithm = path.parent.parent.name
        content = hashlib.new(algorithm, path.read_bytes()).hexdigest()
        assert content == path.name, f"{path} does not hold its digest's bytes"


def basic_header(login: str, password: str) -> str:
    token = base64.b64encode(f"{login}:{password}".encode()).decode()
    return f"Authorization: Basic {token}\r\n"


def raw_request(server: ServerProcess, head: str, body: bytes) -> bytes:
    """Send a request head and a body (possibly shorter than announced), close the
    sending side, and return whatever the server sends before it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def logged_requests(
    server: ServerProcess, path: str, error_code: str | None = None
) -> list[dict[str, Any]]:
    """Return the server's request log entries for `path`, oldest first.

    With `error_code`, only the entries of requests that ended with that code.
    """
    entries = []
    for line in server.log().splitlines():
        if f'"{path}"' not in line:
            continue
        entry = json.loads(line)
        if entry.get("event") != "request" or entry.get("path") != path:
            continue
        if error_code is None or entry.get("error_code") == error_code:
            entries.append(entry)
    return entries


def wait_for_request(
    server: ServerProcess,
    path: str,
    count: int,
    error_code: str | None = None,
    timeout: float = 10,
) -> dict[str, Any]:
    """Wait until the server has logged `count` requests to `path`; return the last.

    The middleware writes a request's log line after the handler's clean-up and
    after the response went out, so a client may see the response first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = logged_requests(server, path, error_code)
        if len(entries) >= count:
            return entries[count - 1]
        time.sleep(0.05)
    raise AssertionError(f"no log line for request {count} to {path} in {timeout} s")
