"""Blobs: `GET` and `HEAD` with Range, and `DELETE`."""

from __future__ import annotations

import os

import pytest

from tests.support.registry import (
    Account,
    assert_error,
    digest_of,
    make_image,
    push_blob,
    push_image,
)

BLOB = os.urandom(1000)


@pytest.fixture(scope="module")
def stored(writer: Account) -> tuple[str, str]:
    """A repository holding BLOB, and BLOB's digest."""
    repository = writer.repository("blobs")
    return repository, push_blob(writer.client, repository, BLOB)


def test_blob_get_whole(writer: Account, stored: tuple[str, str]) -> None:
    """GET returns the exact bytes with digest, length and range headers."""
    repository, digest = stored
    response = writer.client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200
    assert response.content == BLOB
    assert response.headers["docker-content-digest"] == digest
    assert response.headers["content-length"] == str(len(BLOB))
    assert response.headers["accept-ranges"] == "bytes"


def test_blob_head_no_body(writer: Account, stored: tuple[str, str]) -> None:
    """HEAD sends the GET headers and no body."""
    repository, digest = stored
    get = writer.client.get(f"/v2/{repository}/blobs/{digest}")
    head = writer.client.head(f"/v2/{repository}/blobs/{digest}")
    assert head.status_code == 200
    assert head.content == b""
    for header in ("content-length", "docker-content-digest", "etag", "content-type"):
        assert head.headers[header] == get.headers[header]


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=-5000", 0, 999),
        ("bytes=995-5000", 995, 999),
        ("bytes=999-999", 999, 999),
    ],
)
def test_blob_range_partial(
    writer: Account, stored: tuple[str, str], range_header: str, start: int, end: int
) -> None:
    """A satisfiable Range gets 206 with those bytes and Content-Range."""
    repository, digest = stored
    response = writer.client.get(
        f"/v2/{repository}/blobs/{digest}", headers={"Range": range_header}
    )
    assert response.status_code == 206
    assert response.content == BLOB[start : end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/{len(BLOB)}"
    assert response.headers["content-length"] == str(end - start + 1)


def test_blob_head_range(writer: Account, stored: tuple[str, str]) -> None:
    """HEAD with a Range answers 206 with the range's headers and no body."""
    repository, digest = stored
    response = writer.client.head(
        f"/v2/{repository}/blobs/{digest}", headers={"Range": "bytes=100-199"}
    )
    assert response.status_code == 206
    assert response.content == b""
    assert response.headers["content-range"] == f"bytes 100-199/{len(BLOB)}"
    assert response.headers["content-length"] == "100"


@pytest.mark.parametrize("range_header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_blob_range_unsatisfiable(
    writer: Account, stored: tuple[str, str], range_header: str
) -> None:
    """A Range past the end gets 416 with `Content-Range: bytes */size`."""
    repository, digest = stored
    response = writer.client.get(
        f"/v2/{repository}/blobs/{digest}", headers={"Range": range_header}
    )
    assert_error(response, 416, "RANGE_INVALID")
    assert response.headers["content-range"] == f"bytes */{len(BLOB)}"


def test_blob_unknown(writer: Account, stored: tuple[str, str]) -> None:
    """A digest nobody pushed gets 404 BLOB_UNKNOWN on GET and a bare 404 on HEAD."""
    repository, _ = stored
    missing = digest_of(b"never pushed")
    assert_error(
        writer.client.get(f"/v2/{repository}/blobs/{missing}"), 404, "BLOB_UNKNOWN"
    )
    head = writer.client.head(f"/v2/{repository}/blobs/{missing}")
    assert head.status_code == 404
    assert head.content == b""


def test_blob_other_repository(writer: Account, stored: tuple[str, str]) -> None:
    """A blob pushed to one repository is not visible in another one."""
    _, digest = stored
    other = writer.repository("other")
    push_blob(writer.client, other, b"something else")
    response = writer.client.get(f"/v2/{other}/blobs/{digest}")
    assert_error(response, 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize(
    ("digest", "code"),
    [
        ("sha256:abc", "DIGEST_INVALID"),
        ("sha256:" + "A" * 64, "DIGEST_INVALID"),
        ("md5:" + "0" * 32, "UNSUPPORTED"),
        ("not-a-digest", "DIGEST_INVALID"),
    ],
)
def test_blob_invalid_digest(
    writer: Account, stored: tuple[str, str], digest: str, code: str
) -> None:
    """A malformed digest gets 400 with DIGEST_INVALID or UNSUPPORTED."""
    repository, _ = stored
    response = writer.client.get(f"/v2/{repository}/blobs/{digest}")
    assert_error(response, 400, code)


def test_blob_delete(writer: Account, maintainer: Account) -> None:
    """DELETE answers 202 and the blob is gone from that repository only."""
    repository = writer.repository("delete")
    other = writer.repository("keep")
    data = os.urandom(64)
    digest = push_blob(writer.client, repository, data)
    push_blob(writer.client, other, data)
    response = maintainer.client.delete(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 202
    gone = writer.client.get(f"/v2/{repository}/blobs/{digest}")
    assert_error(gone, 404, "BLOB_UNKNOWN")
    assert writer.client.get(f"/v2/{other}/blobs/{digest}").content == data
    again = maintainer.client.delete(f"/v2/{repository}/blobs/{digest}")
    assert_error(again, 404, "BLOB_UNKNOWN")


def test_blob_delete_needs_role(writer: Account, stored: tuple[str, str]) -> None:
    """A writer may not delete: 403 DENIED, and the blob stays."""
    repository, digest = stored
    response = writer.client.delete(f"/v2/{repository}/blobs/{digest}")
    assert_error(response, 403, "DENIED")
    assert writer.client.get(f"/v2/{repository}/blobs/{digest}").content == BLOB


def test_blob_delete_referenced(writer: Account, maintainer: Account) -> None:
    """A blob that a manifest still references cannot be deleted (405), and stays.

    Once the manifest is gone, the same DELETE succeeds and the blob is gone.
    """
    repository = writer.repository("referenced")
    image = make_image("referenced")
    push_image(writer.client, repository, image, "v1")
    layer = digest_of(image.blobs[1])
    path = f"/v2/{repository}/blobs/{layer}"
    refused = maintainer.client.delete(path)
    assert_error(refused, 405, "UNSUPPORTED")
    assert image.digest in refused.json()["errors"][0]["message"]
    assert writer.client.get(path).content == image.blobs[1]
    manifest = f"/v2/{repository}/manifests/{image.digest}"
    assert maintainer.client.delete(manifest).status_code == 202
    assert maintainer.client.delete(path).status_code == 202
    assert_error(writer.client.get(path), 404, "BLOB_UNKNOWN")
