"""A small registry client on `http.client`, lean enough not to be the bottleneck.

Blob bodies are sent from memory views of a mapped file (one `sendall` per
request) and read into one reusable buffer, so the client copies little.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from bench.servers import PASSWORD, SERVICE, USER

BLOCK_BYTES = 1024 * 1024
_NEXT_LINK = re.compile(r"<([^>]+)>")


class RegistryError(Exception):
    """A registry answered with an unexpected status."""


def basic_header(login: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def fetch_token(token_url: str, scopes: list[str]) -> str:
    """Ask Moorage's token service for a bearer token covering `scopes`."""
    query = urlencode([("service", SERVICE)] + [("scope", s) for s in scopes])
    parts = urlsplit(token_url)
    connection = http.client.HTTPConnection(parts.netloc)
    try:
        connection.request(
            "GET", f"{parts.path}?{query}", headers={"Authorization": basic_header()}
        )
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RegistryError(f"token request failed: {response.status} {body[:200]!r}")
    return str(json.loads(body)["token"])


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class Client:
    """One keep-alive connection to a registry, authenticated with a bearer token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.netloc = urlsplit(base_url).netloc
        self.token = token
        self.connection = http.client.HTTPConnection(
            self.netloc, blocksize=BLOCK_BYTES, timeout=600
        )

    def close(self) -> None:
        self.connection.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> Response:
        sent = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if body is None and method in ("PUT", "POST", "PATCH"):
            sent.setdefault("Content-Length", "0")
        self.connection.request(method, _path_of(path), body=body, headers=sent)
        response = self.connection.getresponse()
        data = response.read()
        if response.status not in expect:
            raise RegistryError(f"{method} {path}: {response.status} {data[:300]!r}")
        return Response(response.status, response.headers, data)

    # Blobs

    def start_upload(self, repository: str) -> str:
        response = self.request(
            "POST", f"/v2/{repository}/blobs/uploads/", expect=(202,)
        )
        return response.headers["Location"]

    def push_blob(self, repository: str, digest: str, data: Any) -> None:
        """Push in one PUT after POST, the OCI "monolithic" upload."""
        location = self.start_upload(repository)
        self.request(
            "PUT",
            _with_query(location, digest=digest),
            body=data,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(data)),
            },
            expect=(201,),
        )

    def push_blob_chunked(
        self, repository: str, digest: str, data: Any, chunk: int
    ) -> None:
        """Push with PATCH requests of `chunk` bytes, then an empty PUT."""
        location = self.start_upload(repository)
        for start in range(0, len(data), chunk):
            part = data[start : start + chunk]
            response = self.request(
                "PATCH",
                location,
                body=part,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(part)),
                    "Content-Range": f"{start}-{start + len(part) - 1}",
                },
                expect=(202,),
            )
            location = response.headers["Location"]
        self.request("PUT", _with_query(location, digest=digest), expect=(201,))

    def pull_blob(self, repository: str, digest: str, buffer: bytearray) -> int:
        """Read a blob into `buffer` over and over; return the bytes received."""
        self.connection.request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        response = self.connection.getresponse()
        if response.status != 200:
            raise RegistryError(
                f"GET blob: {response.status} {response.read()[:300]!r}"
            )
        view = memoryview(buffer)
        received = 0
        while True:
            count = response.readinto(view)
            if not count:
                break
            received += count
        return received

    # Manifests and listings

    def put_manifest(
        self, repository: str, reference: str, body: bytes, media_type: str
    ) -> None:
        self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            body=body,
            headers={"Content-Type": media_type},
            expect=(201,),
        )

    def follow_pages(self, path: str, key: str) -> list[str]:
        """GET a paginated list, following `Link: rel="next"` to the end."""
        found: list[str] = []
        next_path: str | None = path
        while next_path is not None:
            response = self.request("GET", next_path)
            found.extend(json.loads(response.body).get(key) or [])
            link = response.headers.get("Link")
            match = _NEXT_LINK.search(link) if link else None
            next_path = match.group(1) if match else None
        return found


def _path_of(location: str) -> str:
    """Strip scheme and host from an absolute Location; keep path and query."""
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _with_query(location: str, **params: str) -> str:
    separator = "&" if "?" in location else "?"
    return f"{location}{separator}{urlencode(params)}"
