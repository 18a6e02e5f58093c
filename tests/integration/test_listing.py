"""`tags/list`, `_catalog` and `referrers`, with their pagination and filters."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.support.registry import (
    OCI_INDEX,
    OCI_MANIFEST,
    Account,
    Image,
    assert_error,
    descriptor,
    digest_of,
    make_image,
    push_image,
    put_manifest,
    to_json,
)
from tests.support.server import ServerProcess

TAGS = ["1.0", "1.1", "2.0", "A", "latest", "v_1"]
SBOM = "application/vnd.example.sbom+json"
SIGNATURE = "application/vnd.example.signature"


def link_target(response: httpx.Response) -> httpx.URL:
    """Return the URL of a `Link: <url>; rel="next"` header."""
    url, _, relation = response.headers["link"].partition(";")
    assert relation.strip() == 'rel="next"'
    assert url.startswith("<")
    assert url.endswith(">")
    return httpx.URL(url[1:-1])


@pytest.fixture(scope="module")
def tagged(writer: Account) -> str:
    """A repository with one manifest under every name in TAGS."""
    repository = writer.repository("tags")
    image = make_image("tags")
    push_image(writer.client, repository, image)
    for tag in reversed(TAGS):
        put_manifest(writer.client, repository, tag, image.manifest)
    return repository


def test_tags_list_all(writer: Account, tagged: str) -> None:
    """tags/list returns every tag in lexical order, without a Link."""
    response = writer.client.get(f"/v2/{tagged}/tags/list")
    assert response.status_code == 200
    assert response.json() == {"name": tagged, "tags": sorted(TAGS)}
    assert "link" not in response.headers


@pytest.mark.parametrize(
    ("params", "expected", "link_last"),
    [
        ({"n": "2"}, ["1.0", "1.1"], "1.1"),
        ({"n": "2", "last": "1.1"}, ["2.0", "A"], "A"),
        ({"n": "2", "last": "A"}, ["latest", "v_1"], None),
        ({"n": "10", "last": "2.0"}, ["A", "latest", "v_1"], None),
        ({"last": "latest"}, ["v_1"], None),
        ({"n": "0"}, [], None),
        ({"last": "zzz"}, [], None),
    ],
)
def test_tags_list_pages(
    writer: Account,
    tagged: str,
    params: dict[str, str],
    expected: list[str],
    link_last: str | None,
) -> None:
    """n and last page through the tags; Link names the next page."""
    response = writer.client.get(f"/v2/{tagged}/tags/list", params=params)
    assert response.status_code == 200
    assert response.json()["tags"] == expected
    if link_last is None:
        assert "link" not in response.headers
    else:
        next_page = link_target(response)
        assert next_page.path == f"/v2/{tagged}/tags/list"
        assert dict(next_page.params) == {"n": params["n"], "last": link_last}


def test_tags_list_invalid_n(writer: Account, tagged: str) -> None:
    """A non-numeric n gets 400 PAGINATION_NUMBER_INVALID."""
    response = writer.client.get(f"/v2/{tagged}/tags/list", params={"n": "-1"})
    assert_error(response, 400, "PAGINATION_NUMBER_INVALID")


def test_tags_list_unknown(writer: Account) -> None:
    """tags/list of a repository that does not exist gets 404 NAME_UNKNOWN."""
    response = writer.client.get(f"/v2/{writer.repository()}/tags/list")
    assert_error(response, 404, "NAME_UNKNOWN")


def test_catalog_own_repositories(new_account: Callable[..., Account]) -> None:
    """The catalog lists exactly the caller's pullable repositories, paged."""
    account = new_account(role="reader")
    pusher = new_account(account.customer)
    names = sorted(f"{account.customer}/repo-{n}" for n in range(5))
    for name in names:
        push_image(pusher.client, name, make_image(name), "v1")
    stranger = new_account()
    push_image(stranger.client, stranger.repository(), make_image("stranger"), "v1")

    everything = account.client.get("/v2/_catalog")
    assert everything.status_code == 200
    assert everything.json() == {"repositories": names}
    first = account.client.get("/v2/_catalog", params={"n": "2"})
    assert first.json()["repositories"] == names[:2]
    next_page = link_target(first)
    assert next_page.path == "/v2/_catalog"
    assert dict(next_page.params) == {"n": "2", "last": names[1]}
    second = account.client.get(str(next_page))
    assert second.json()["repositories"] == names[2:4]
    last = account.client.get("/v2/_catalog", params={"n": "2", "last": names[3]})
    assert last.json()["repositories"] == names[4:]
    assert "link" not in last.headers


def test_catalog_needs_login(server: ServerProcess) -> None:
    """An anonymous catalog request gets 401 with a catalog scope challenge."""
    response = httpx.get(f"{server.url}/v2/_catalog")
    assert_error(response, 401, "UNAUTHORIZED")
    assert 'scope="registry:catalog:*"' in response.headers["www-authenticate"]


@pytest.fixture(scope="module")
def referred(writer: Account) -> tuple[str, Image, list[Image]]:
    """A repository with a subject image and three artifacts that name it."""
    repository = writer.repository("referrers")
    subject = make_image("subject")
    push_image(writer.client, repository, subject, "v1")
    artifacts = [
        make_image(
            "sbom-1", artifact_type=SBOM, subject=subject, annotations={"n": "1"}
        ),
        make_image("sig-1", artifact_type=SIGNATURE, subject=subject),
        make_image("sbom-2", artifact_type=SBOM, subject=subject),
    ]
    for artifact in artifacts:
        push_image(writer.client, repository, artifact)
    return repository, subject, artifacts


def test_referrers_all(
    writer: Account, referred: tuple[str, Image, list[Image]]
) -> None:
    """referrers lists every manifest whose subject is the digest, as an index."""
    repository, subject, artifacts = referred
    response = writer.client.get(f"/v2/{repository}/referrers/{subject.digest}")
    assert response.status_code == 200
    assert response.headers["content-type"] == OCI_INDEX
    assert "oci-filters-applied" not in response.headers
    index = response.json()
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    by_digest = {entry["digest"]: entry for entry in index["manifests"]}
    assert set(by_digest) == {artifact.digest for artifact in artifacts}
    first = by_digest[artifacts[0].digest]
    assert first["artifactType"] == SBOM
    assert first["size"] == len(artifacts[0].manifest)
    assert first["annotations"] == {"n": "1"}
    assert "annotations" not in by_digest[artifacts[1].digest]


def test_referrers_filter(
    writer: Account, referred: tuple[str, Image, list[Image]]
) -> None:
    """artifactType filters the list, and OCI-Filters-Applied names the filter."""
    repository, subject, artifacts = referred
    response = writer.client.get(
        f"/v2/{repository}/referrers/{subject.digest}", params={"artifactType": SBOM}
    )
    assert response.headers["oci-filters-applied"] == "artifactType"
    digests = {entry["digest"] for entry in response.json()["manifests"]}
    assert digests == {artifacts[0].digest, artifacts[2].digest}


def test_referrers_unknown_subject(
    writer: Account, referred: tuple[str, Image, list[Image]]
) -> None:
    """A digest nothing refers to gets 200 and an empty index."""
    repository, _, _ = referred
    response = writer.client.get(f"/v2/{repository}/referrers/{digest_of(b'x')}")
    assert response.status_code == 200
    assert response.json()["manifests"] == []


def test_referrers_invalid_digest(
    writer: Account, referred: tuple[str, Image, list[Image]]
) -> None:
    """A malformed digest gets 400 DIGEST_INVALID."""
    repository, _, _ = referred
    response = writer.client.get(f"/v2/{repository}/referrers/sha256:short")
    assert_error(response, 400, "DIGEST_INVALID")


def test_referrers_follow_delete(
    writer: Account, maintainer: Account, referred: tuple[str, Image, list[Image]]
) -> None:
    """A deleted artifact disappears from the referrers of its subject."""
    repository, subject, _ = referred
    extra = make_image("short-lived", artifact_type=SIGNATURE, subject=subject)
    push_image(writer.client, repository, extra)
    path = f"/v2/{repository}/referrers/{subject.digest}"
    params = {"artifactType": SIGNATURE}
    before = writer.client.get(path, params=params).json()["manifests"]
    assert extra.digest in {entry["digest"] for entry in before}
    maintainer.client.delete(f"/v2/{repository}/manifests/{extra.digest}")
    after = writer.client.get(path, params=params).json()["manifests"]
    assert extra.digest not in {entry["digest"] for entry in after}
    assert len(after) == len(before) - 1


def test_referrers_config_type(writer: Account) -> None:
    """Without artifactType, an image's config media type is its artifact type."""
    repository = writer.repository("referrers")
    subject = make_image("plain subject")
    push_image(writer.client, repository, subject, "v1")
    config = b'{"signature": true}'
    layer = b"signature bytes"
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(SIGNATURE, config),
        "layers": [descriptor("application/octet-stream", layer)],
        "subject": subject.descriptor(),
    }
    signature = Image(to_json(document), OCI_MANIFEST, [config, layer])
    push_image(writer.client, repository, signature)
    response = writer.client.get(
        f"/v2/{repository}/referrers/{subject.digest}",
        params={"artifactType": SIGNATURE},
    )
    [entry] = response.json()["manifests"]
    assert entry["digest"] == signature.digest
    assert entry["artifactType"] == SIGNATURE


def test_referrers_of_index(writer: Account) -> None:
    """An index with a subject and artifactType is listed as a referrer."""
    repository = writer.repository("referrers")
    subject = make_image("index subject")
    child = make_image("index child")
    push_image(writer.client, repository, subject, "v1")
    push_image(writer.client, repository, child)
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": SBOM,
        "manifests": [child.descriptor()],
        "subject": subject.descriptor(),
    }
    index = Image(to_json(document), OCI_INDEX)
    response = push_image(writer.client, repository, index)
    assert response.headers["oci-subject"] == subject.digest
    listed = writer.client.get(f"/v2/{repository}/referrers/{subject.digest}")
    [entry] = listed.json()["manifests"]
    assert entry == {
        "mediaType": OCI_INDEX,
        "digest": index.digest,
        "size": len(index.manifest),
        "artifactType": SBOM,
    }
