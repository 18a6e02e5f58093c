"""Manifests: PUT, GET, HEAD and DELETE of images, indexes and artifacts."""

from __future__ import annotations

import json

import pytest

from tests.support.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Account,
    Image,
    assert_error,
    digest_of,
    make_image,
    make_index,
    push_blob,
    push_image,
    put_manifest,
    to_json,
)

ARTIFACT_TYPE = "application/vnd.example.sbom+json"


def pushed(writer: Account, image: Image, tag: str = "v1") -> str:
    """Push `image` by tag into a new repository and return the repository."""
    repository = writer.repository("manifests")
    push_image(writer.client, repository, image, tag)
    return repository


def push_index(writer: Account, media_type: str) -> tuple[str, Image, list[Image]]:
    """Push two child images and an index over them, tagged `multi`."""
    repository = writer.repository("index")
    child_type = DOCKER_MANIFEST if media_type == DOCKER_LIST else OCI_MANIFEST
    children = [make_image(f"child-{n}", media_type=child_type) for n in range(2)]
    for child in children:
        push_image(writer.client, repository, child)
    index = make_index(children, media_type)
    push_image(writer.client, repository, index, "multi")
    return repository, index, children


IMAGE_KINDS = {
    "oci": lambda: make_image("oci", layer_count=2),
    "docker": lambda: make_image("docker", media_type=DOCKER_MANIFEST),
    "artifact": lambda: make_image("artifact", artifact_type=ARTIFACT_TYPE),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_manifest_round_trip(writer: Account, kind: str) -> None:
    """A pushed image manifest is served byte for byte by tag and by digest."""
    image = IMAGE_KINDS[kind]()
    repository = writer.repository(kind)
    for blob in image.blobs:
        push_blob(writer.client, repository, blob)
    response = put_manifest(
        writer.client, repository, "v1", image.manifest, image.media_type
    )
    assert response.status_code == 201
    assert response.headers["docker-content-digest"] == image.digest
    assert response.headers["location"] == f"/v2/{repository}/manifests/{image.digest}"
    for reference in ("v1", image.digest):
        got = writer.client.get(
            f"/v2/{repository}/manifests/{reference}",
            headers={"Accept": image.media_type},
        )
        assert got.status_code == 200
        assert got.content == image.manifest
        assert got.headers["content-type"] == image.media_type
        assert got.headers["docker-content-digest"] == image.digest
        assert got.headers["content-length"] == str(len(image.manifest))


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_index_round_trip(writer: Account, media_type: str) -> None:
    """An index or manifest list whose children exist is stored and served."""
    repository, index, children = push_index(writer, media_type)
    got = writer.client.get(f"/v2/{repository}/manifests/multi")
    assert got.content == index.manifest
    assert got.headers["content-type"] == media_type
    child = writer.client.get(f"/v2/{repository}/manifests/{children[0].digest}")
    assert child.content == children[0].manifest


def test_exact_bytes_kept(writer: Account) -> None:
    """Whitespace and key order of the pushed bytes are kept as they are."""
    image = make_image("spacing")
    document = json.loads(image.manifest)
    spaced = json.dumps(document, indent=3, sort_keys=True).encode() + b"\n"
    repository = writer.repository()
    for blob in image.blobs:
        push_blob(writer.client, repository, blob)
    response = put_manifest(writer.client, repository, "spaced", spaced)
    assert response.headers["docker-content-digest"] == digest_of(spaced)
    got = writer.client.get(f"/v2/{repository}/manifests/spaced")
    assert got.content == spaced


def test_head_matches_get(writer: Account) -> None:
    """HEAD has the same status and headers as GET, and no body."""
    image = make_image("head")
    repository = pushed(writer, image)
    for reference in ("v1", image.digest):
        path = f"/v2/{repository}/manifests/{reference}"
        get = writer.client.get(path)
        head = writer.client.head(path)
        assert head.status_code == get.status_code == 200
        assert head.content == b""
        for header in ("content-type", "content-length", "docker-content-digest"):
            assert head.headers[header] == get.headers[header]
        assert head.headers.get("etag") == get.headers.get("etag")


@pytest.mark.parametrize(
    ("accept", "served"),
    [
        (None, True),
        (OCI_MANIFEST, True),
        (f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5", True),
        ("application/*", True),
        ("*/*", True),
        (DOCKER_MANIFEST, False),
        (OCI_INDEX, False),
    ],
)
def test_accept_negotiation(writer: Account, accept: str | None, served: bool) -> None:
    """A manifest is served only when Accept admits its media type."""
    image = make_image("accept")
    repository = pushed(writer, image)
    headers = {"Accept": accept} if accept else {}
    response = writer.client.get(f"/v2/{repository}/manifests/v1", headers=headers)
    if served:
        assert response.status_code == 200
        assert response.content == image.manifest
    else:
        assert_error(response, 404, "MANIFEST_UNKNOWN")


def test_accept_repeated_headers(writer: Account) -> None:
    """Several Accept headers are read together, as containerd sends them."""
    image = make_image("accept-many")
    repository = pushed(writer, image)
    response = writer.client.get(
        f"/v2/{repository}/manifests/v1",
        headers=[("Accept", DOCKER_MANIFEST), ("Accept", OCI_MANIFEST)],
    )
    assert response.status_code == 200


def test_missing_blob_rejected(writer: Account) -> None:
    """A manifest naming a blob not in the repository gets MANIFEST_BLOB_UNKNOWN."""
    image = make_image("missing-layer", layer_count=2)
    repository = writer.repository()
    for blob in image.blobs[:-1]:
        push_blob(writer.client, repository, blob)
    response = put_manifest(writer.client, repository, "v1", image.manifest)
    error = assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert error["detail"]["digest"] == digest_of(image.blobs[-1])
    assert_error(
        writer.client.get(f"/v2/{repository}/manifests/v1"), 404, "MANIFEST_UNKNOWN"
    )


def test_blob_in_other_repository(writer: Account) -> None:
    """A blob pushed only to another repository does not satisfy a manifest."""
    image = make_image("elsewhere")
    elsewhere = writer.repository()
    for blob in image.blobs:
        push_blob(writer.client, elsewhere, blob)
    response = put_manifest(writer.client, writer.repository(), "v1", image.manifest)
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")


def test_missing_child_rejected(writer: Account) -> None:
    """An index naming a manifest not in the repository is rejected."""
    repository = writer.repository()
    children = [make_image("present"), make_image("absent")]
    push_image(writer.client, repository, children[0])
    index = make_index(children)
    response = put_manifest(
        writer.client, repository, "multi", index.manifest, OCI_INDEX
    )
    error = assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert error["detail"]["digest"] == children[1].digest


def test_manifest_too_large(writer: Account) -> None:
    """A manifest over the 4 MiB default limit gets 413 and is not stored."""
    image = make_image("huge")
    repository = writer.repository()
    for blob in image.blobs:
        push_blob(writer.client, repository, blob)
    document = json.loads(image.manifest)
    document["annotations"] = {"padding": "x" * (4 * 1024 * 1024)}
    response = put_manifest(writer.client, repository, "huge", to_json(document))
    assert_error(response, 413, "SIZE_INVALID")
    assert_error(
        writer.client.get(f"/v2/{repository}/manifests/huge"), 404, "MANIFEST_UNKNOWN"
    )


def test_subject_header(writer: Account) -> None:
    """A manifest with a subject gets OCI-Subject, even if the subject is absent."""
    subject = make_image("subject")
    repository = writer.repository()
    artifact = make_image("sig", artifact_type=ARTIFACT_TYPE, subject=subject)
    response = push_image(writer.client, repository, artifact)
    assert response.headers["oci-subject"] == subject.digest
    plain = push_image(writer.client, repository, subject, "v1")
    assert "oci-subject" not in plain.headers


def test_put_by_digest(writer: Account) -> None:
    """PUT by digest stores the manifest untagged."""
    image = make_image("untagged")
    repository = writer.repository()
    response = push_image(writer.client, repository, image)
    assert response.headers["docker-content-digest"] == image.digest
    tags = writer.client.get(f"/v2/{repository}/tags/list").json()
    assert tags["tags"] == []


def test_put_digest_mismatch(writer: Account) -> None:
    """PUT by a digest that the body does not have gets DIGEST_INVALID."""
    image = make_image("mismatch")
    repository = writer.repository()
    for blob in image.blobs:
        push_blob(writer.client, repository, blob)
    wrong = digest_of(b"something else")
    response = put_manifest(writer.client, repository, wrong, image.manifest)
    assert_error(response, 400, "DIGEST_INVALID")
    assert_error(
        writer.client.get(f"/v2/{repository}/manifests/{wrong}"),
        404,
        "MANIFEST_UNKNOWN",
    )


def test_put_sha512_reference(writer: Account) -> None:
    """PUT by a sha512 digest stores the manifest under that digest."""
    image = make_image("sha512")
    repository = writer.repository()
    for blob in image.blobs:
        push_blob(writer.client, repository, blob)
    digest = digest_of(image.manifest, "sha512")
    response = put_manifest(writer.client, repository, digest, image.manifest)
    assert response.status_code == 201
    assert response.headers["docker-content-digest"] == digest
    got = writer.client.get(f"/v2/{repository}/manifests/{digest}")
    assert got.content == image.manifest


def test_tag_moves(writer: Account) -> None:
    """A second PUT of a tag points it at the new manifest."""
    first, second = make_image("first"), make_image("second")
    repository = pushed(writer, first, "latest")
    push_image(writer.client, repository, second, "latest")
    got = writer.client.get(f"/v2/{repository}/manifests/latest")
    assert got.headers["docker-content-digest"] == second.digest
    old = writer.client.get(f"/v2/{repository}/manifests/{first.digest}")
    assert old.status_code == 200


def test_delete_by_digest(writer: Account, maintainer: Account) -> None:
    """DELETE by digest removes the manifest and every tag on it."""
    image = make_image("delete-digest")
    repository = pushed(writer, image, "a")
    put_manifest(writer.client, repository, "b", image.manifest)
    keep = make_image("keep")
    push_image(writer.client, repository, keep, "keep")
    path = f"/v2/{repository}/manifests/{image.digest}"
    assert maintainer.client.delete(path).status_code == 202
    assert_error(writer.client.get(path), 404, "MANIFEST_UNKNOWN")
    for tag in ("a", "b"):
        response = writer.client.get(f"/v2/{repository}/manifests/{tag}")
        assert_error(response, 404, "MANIFEST_UNKNOWN")
    tags = writer.client.get(f"/v2/{repository}/tags/list").json()["tags"]
    assert tags == ["keep"]
    assert_error(maintainer.client.delete(path), 404, "MANIFEST_UNKNOWN")


def test_delete_by_tag(writer: Account, maintainer: Account) -> None:
    """DELETE by tag removes only that tag; the manifest stays by digest."""
    image = make_image("delete-tag")
    repository = pushed(writer, image, "a")
    put_manifest(writer.client, repository, "b", image.manifest)
    assert maintainer.client.delete(f"/v2/{repository}/manifests/a").status_code == 202
    gone = writer.client.get(f"/v2/{repository}/manifests/a")
    assert_error(gone, 404, "MANIFEST_UNKNOWN")
    assert writer.client.get(f"/v2/{repository}/manifests/b").status_code == 200
    by_digest = writer.client.get(f"/v2/{repository}/manifests/{image.digest}")
    assert by_digest.status_code == 200


def test_delete_needs_role(writer: Account) -> None:
    """A writer may not delete manifests: 403 DENIED."""
    image = make_image("keep-me")
    repository = pushed(writer, image)
    response = writer.client.delete(f"/v2/{repository}/manifests/{image.digest}")
    assert_error(response, 403, "DENIED")


def test_unknown_manifest(writer: Account) -> None:
    """Unknown tags and digests get 404 MANIFEST_UNKNOWN on GET and HEAD."""
    repository = pushed(writer, make_image("known"))
    for reference in ("nope", digest_of(b"nope")):
        path = f"/v2/{repository}/manifests/{reference}"
        assert_error(writer.client.get(path), 404, "MANIFEST_UNKNOWN")
        assert writer.client.head(path).status_code == 404


@pytest.mark.parametrize(
    ("body", "media_type"),
    [
        (b"{not json", OCI_MANIFEST),
        (b"[]", OCI_MANIFEST),
        (b'{"schemaVersion": 1}', OCI_MANIFEST),
        (to_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST}), OCI_MANIFEST),
        (to_json({"schemaVersion": 2, "mediaType": "text/plain"}), "text/plain"),
        (to_json({"schemaVersion": 2, "mediaType": OCI_INDEX}), OCI_MANIFEST),
        (
            to_json(
                {
                    "schemaVersion": 2,
                    "config": {"mediaType": "x", "digest": "sha256:bad", "size": 1},
                    "layers": [],
                }
            ),
            OCI_MANIFEST,
        ),
        (
            to_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}),
            OCI_INDEX,
        ),
        (b"\xff\xfe", OCI_MANIFEST),
    ],
    ids=[
        "not-json",
        "array",
        "schema-1",
        "no-config",
        "unknown-type",
        "type-mismatch",
        "bad-descriptor-digest",
        "manifests-not-list",
        "not-utf8",
    ],
)
def test_invalid_manifest(writer: Account, body: bytes, media_type: str) -> None:
    """A malformed manifest gets 400 MANIFEST_INVALID and nothing is stored."""
    repository = writer.repository()
    response = put_manifest(writer.client, repository, "bad", body, media_type)
    assert_error(response, 400, "MANIFEST_INVALID")
    assert_error(
        writer.client.get(f"/v2/{repository}/manifests/bad"), 404, "MANIFEST_UNKNOWN"
    )


def test_reader_cannot_push(reader: Account, writer: Account) -> None:
    """A reader may pull a manifest but gets 403 DENIED on PUT."""
    image = make_image("read-only")
    repository = pushed(writer, image)
    assert reader.client.get(f"/v2/{repository}/manifests/v1").status_code == 200
    response = put_manifest(reader.client, repository, "v2", image.manifest)
    assert_error(response, 403, "DENIED")
