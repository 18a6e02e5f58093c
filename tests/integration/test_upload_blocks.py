"""Large uploads cross the registry's hashing blocks and early disk syncs."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from tests.support.server import unique

MIB = 1024 * 1024


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _start(client: httpx.Client, repository: str) -> str:
    response = client.post(f"/v2/{repository}/blobs/uploads/")
    assert response.status_code == 202, response.text
    return response.headers["Location"]


def _pull(client: httpx.Client, repository: str, digest: str) -> bytes:
    response = client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200, response.text
    return response.content


@pytest.mark.parametrize("size", [4 * MIB - 1, 9 * MIB + 3, 40 * MIB + 17])
def test_upload_monolithic_round_trips(admin_client: httpx.Client, size: int) -> None:
    """A one-request upload of an uneven size comes back byte for byte."""
    repository = f"{unique('blocks')}/mono"
    data = os.urandom(size)
    location = _start(admin_client, repository)
    response = admin_client.put(
        location,
        params={"digest": _digest(data)},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    assert _pull(admin_client, repository, _digest(data)) == data


def test_upload_chunked_round_trips(admin_client: httpx.Client) -> None:
    """Chunks that straddle block boundaries are hashed and stored in order."""
    repository = f"{unique('blocks')}/chunked"
    data = os.urandom(13 * MIB + 5)
    location = _start(admin_client, repository)
    step = 5 * MIB + 1
    for start in range(0, len(data), step):
        part = data[start : start + step]
        response = admin_client.patch(
            location,
            content=part,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(part) - 1}",
            },
        )
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
    response = admin_client.put(location, params={"digest": _digest(data)})
    assert response.status_code == 201, response.text
    assert _pull(admin_client, repository, _digest(data)) == data


def test_upload_with_wrong_digest_is_rejected(admin_client: httpx.Client) -> None:
    """A large body whose digest does not match is refused and not stored."""
    repository = f"{unique('blocks')}/wrong"
    data = os.urandom(9 * MIB)
    wrong = _digest(data + b"x")
    location = _start(admin_client, repository)
    response = admin_client.put(location, params={"digest": wrong}, content=data)
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert admin_client.head(f"/v2/{repository}/blobs/{wrong}").status_code == 404
