"""Blob uploads: sessions, monolithic, streamed and chunked PATCH, PUT, mount."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.registry import (
    Account,
    assert_error,
    assert_storage_consistent,
    digest_of,
    make_image,
    push_blob,
    put_manifest,
    start_upload,
    stored_blob_files,
    upload_dir,
)
from tests.support.server import ServerProcess

DATA = os.urandom(3000)


def chunk_headers(start: int, chunk: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Content-Range": f"{start}-{start + len(chunk) - 1}",
        "Content-Length": str(len(chunk)),
    }


def upload_id(location: str) -> str:
    return location.rsplit("/", 1)[1]


def assert_blob(account: Account, repository: str, data: bytes, digest: str) -> None:
    response = account.client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200
    assert response.content == data


def test_post_opens_session(writer: Account) -> None:
    """POST returns 202 with Location, Range 0-0 and the upload's UUID."""
    repository = writer.repository()
    response = writer.client.post(f"/v2/{repository}/blobs/uploads/")
    assert response.status_code == 202
    location = response.headers["location"]
    assert location.startswith(f"/v2/{repository}/blobs/uploads/")
    assert response.headers["range"] == "0-0"
    assert response.headers["docker-upload-uuid"] == upload_id(location)


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_monolithic_post(writer: Account, algorithm: str) -> None:
    """POST ?digest= with the body commits the blob at once (201, Location)."""
    repository = writer.repository()
    digest = digest_of(DATA, algorithm)
    response = writer.client.post(
        f"/v2/{repository}/blobs/uploads/", params={"digest": digest}, content=DATA
    )
    assert response.status_code == 201
    assert response.headers["location"] == f"/v2/{repository}/blobs/{digest}"
    assert response.headers["docker-content-digest"] == digest
    assert_blob(writer, repository, DATA, digest)


def test_streamed_patch_then_put(writer: Account) -> None:
    """PATCH without Content-Range appends, as docker and podman send chunks."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)

    def body() -> Iterator[bytes]:
        yield DATA[:1000]
        yield DATA[1000:]

    response = writer.client.patch(location, content=body())
    assert response.status_code == 202
    assert response.headers["range"] == f"0-{len(DATA) - 1}"
    location = response.headers["location"]
    more = b"tail bytes"
    response = writer.client.patch(location, content=more)
    assert response.headers["range"] == f"0-{len(DATA) + len(more) - 1}"
    digest = digest_of(DATA + more)
    done = writer.client.put(location, params={"digest": digest})
    assert done.status_code == 201
    assert done.headers["docker-content-digest"] == digest
    assert_blob(writer, repository, DATA + more, digest)


def test_chunked_patch_in_order(writer: Account) -> None:
    """Chunks with Content-Range append in order; Range reports the last byte."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    for start in range(0, len(DATA), 1000):
        chunk = DATA[start : start + 1000]
        response = writer.client.patch(
            location, content=chunk, headers=chunk_headers(start, chunk)
        )
        assert response.status_code == 202
        assert response.headers["range"] == f"0-{start + len(chunk) - 1}"
        location = response.headers["location"]
    done = writer.client.put(location, params={"digest": digest_of(DATA)})
    assert done.status_code == 201
    assert_blob(writer, repository, DATA, digest_of(DATA))


@pytest.mark.parametrize(
    ("start", "length"),
    [(1500, 500), (0, 1000), (500, 1000), (999, 10)],
    ids=["gap", "repeat", "overlap", "one-byte-overlap"],
)
def test_chunk_out_of_order(writer: Account, start: int, length: int) -> None:
    """A chunk that does not start at the current size gets 416 and is dropped."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    first = DATA[:1000]
    response = writer.client.patch(
        location, content=first, headers=chunk_headers(0, first)
    )
    assert response.status_code == 202
    bad = DATA[start : start + length]
    rejected = writer.client.patch(
        location, content=bad, headers=chunk_headers(start, bad)
    )
    assert_error(rejected, 416, "RANGE_INVALID")
    assert rejected.headers["range"] == "0-999"
    assert rejected.headers["location"] == location
    status = writer.client.get(location)
    assert status.headers["range"] == "0-999"
    rest = DATA[1000:]
    response = writer.client.patch(
        location, content=rest, headers=chunk_headers(1000, rest)
    )
    assert response.status_code == 202
    done = writer.client.put(location, params={"digest": digest_of(DATA)})
    assert done.status_code == 201
    assert_blob(writer, repository, DATA, digest_of(DATA))


@pytest.mark.parametrize(
    ("received", "start"),
    [(1000, 2000), (1000, 0), (1000, 500), (0, 1000)],
    ids=["gap", "repeat", "overlap", "empty-session-gap"],
)
def test_put_last_chunk_out_of_order(
    server: ServerProcess, writer: Account, received: int, start: int
) -> None:
    """A PUT whose last chunk does not start at the current size gets 416.

    The session is left unchanged, so the client can send the chunk again from
    the offset that GET reports.
    """
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    if received:
        first = DATA[:received]
        response = writer.client.patch(
            location, content=first, headers=chunk_headers(0, first)
        )
        assert response.status_code == 202
    bad = DATA[start:]
    rejected = writer.client.put(
        location,
        params={"digest": digest_of(DATA)},
        content=bad,
        headers=chunk_headers(start, bad),
    )
    assert_error(rejected, 416, "RANGE_INVALID")
    expected_range = f"0-{received - 1}" if received else "0-0"
    assert rejected.headers["range"] == expected_range
    assert rejected.headers["location"] == location
    status = writer.client.get(location)
    assert status.status_code == 204
    assert status.headers["range"] == expected_range
    rest = DATA[received:]
    done = writer.client.put(
        location,
        params={"digest": digest_of(DATA)},
        content=rest,
        headers=chunk_headers(received, rest),
    )
    assert done.status_code == 201
    assert_blob(writer, repository, DATA, digest_of(DATA))
    assert_storage_consistent(server)


def test_put_last_chunk_length_mismatch(writer: Account) -> None:
    """A PUT whose Content-Length disagrees with its Content-Range gets 400."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    headers = chunk_headers(0, DATA) | {"Content-Range": f"0-{len(DATA)}"}
    rejected = writer.client.put(
        location, params={"digest": digest_of(DATA)}, content=DATA, headers=headers
    )
    assert_error(rejected, 400, "SIZE_INVALID")
    assert writer.client.get(location).headers["range"] == "0-0"


def test_put_with_last_chunk(writer: Account) -> None:
    """PUT may carry the last chunk, which is appended before the check."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.patch(location, content=DATA[:2000])
    done = writer.client.put(
        location,
        params={"digest": digest_of(DATA)},
        content=DATA[2000:],
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status_code == 201
    assert_blob(writer, repository, DATA, digest_of(DATA))


def test_put_whole_body(writer: Account) -> None:
    """POST then a PUT with the whole body works without any PATCH."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    done = writer.client.put(location, params={"digest": digest_of(DATA)}, content=DATA)
    assert done.status_code == 201
    assert_blob(writer, repository, DATA, digest_of(DATA))


@pytest.mark.parametrize("size", [1, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024])
def test_put_whole_body_sizes(
    server: ServerProcess, writer: Account, size: int
) -> None:
    """A whole body in the PUT is stored whether it is received in memory or not.

    Up to 256 KiB the registry keeps the body in memory and stores it with one
    put; above that it streams the body through the session's data file.
    """
    data = os.urandom(size)
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    done = writer.client.put(location, params={"digest": digest_of(data)}, content=data)
    assert done.status_code == 201
    assert_blob(writer, repository, data, digest_of(data))
    assert not upload_dir(server, upload_id(location)).exists()
    assert_storage_consistent(server)


def test_put_whole_body_wrong_digest(server: ServerProcess, writer: Account) -> None:
    """A whole body with the wrong digest cancels the session and stores nothing."""
    data = os.urandom(3000)
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    wrong = digest_of(data[:-1])
    response = writer.client.put(location, params={"digest": wrong}, content=data)
    assert_error(response, 400, "DIGEST_INVALID")
    assert_error(writer.client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    stored = [path.name for path in stored_blob_files(server)]
    assert wrong.partition(":")[2] not in stored
    assert digest_of(data).partition(":")[2] not in stored


def test_put_whole_body_after_dead_request(
    server: ServerProcess, writer: Account
) -> None:
    """Bytes that a dead request left in the session's data do not reach the blob."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    leftover = upload_dir(server, upload_id(location))
    leftover.mkdir(parents=True)
    (leftover / "data").write_bytes(b"unrecorded bytes")
    done = writer.client.put(location, params={"digest": digest_of(DATA)}, content=DATA)
    assert done.status_code == 201
    assert_blob(writer, repository, DATA, digest_of(DATA))
    assert not leftover.exists()
    assert_storage_consistent(server)


def test_put_sha512(writer: Account) -> None:
    """A session verified against a sha512 digest commits under that digest."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.patch(location, content=DATA)
    digest = digest_of(DATA, "sha512")
    done = writer.client.put(location, params={"digest": digest})
    assert done.status_code == 201
    assert done.headers["docker-content-digest"] == digest
    assert_blob(writer, repository, DATA, digest)


def test_empty_blob(writer: Account) -> None:
    """A zero-byte blob can be uploaded and read back."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    digest = digest_of(b"")
    done = writer.client.put(location, params={"digest": digest})
    assert done.status_code == 201
    assert_blob(writer, repository, b"", digest)


def test_put_without_digest(writer: Account) -> None:
    """PUT without ?digest= gets 400 DIGEST_INVALID and the session stays open."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.patch(location, content=b"abc")
    assert_error(writer.client.put(location), 400, "DIGEST_INVALID")
    assert writer.client.get(location).status_code == 204


def test_status_reports_range(writer: Account) -> None:
    """GET on a session returns 204 with Location and the bytes received."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.patch(location, content=DATA[:22])
    response = writer.client.get(location)
    assert response.status_code == 204
    assert response.headers["range"] == "0-21"
    assert response.headers["location"] == location
    assert response.content == b""


def test_cancel_upload(server: ServerProcess, writer: Account) -> None:
    """DELETE cancels a session: 204, its data is gone, the id is unknown."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.patch(location, content=DATA)
    assert upload_dir(server, upload_id(location)).exists()
    assert writer.client.delete(location).status_code == 204
    assert not upload_dir(server, upload_id(location)).exists()
    assert_error(writer.client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    patch = writer.client.patch(location, content=b"more")
    assert_error(patch, 404, "BLOB_UPLOAD_UNKNOWN")
    put = writer.client.put(location, params={"digest": digest_of(DATA)})
    assert_error(put, 404, "BLOB_UPLOAD_UNKNOWN")


def test_finished_session_unknown(writer: Account) -> None:
    """A committed session is gone: further requests get BLOB_UPLOAD_UNKNOWN."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.put(location, params={"digest": digest_of(DATA)}, content=DATA)
    assert_error(writer.client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


def test_session_bound_to_repository(writer: Account) -> None:
    """A session id used under another repository is unknown there."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    elsewhere = location.replace(repository, writer.repository())
    assert_error(writer.client.get(elsewhere), 404, "BLOB_UPLOAD_UNKNOWN")
    patch = writer.client.patch(elsewhere, content=b"abc")
    assert_error(patch, 404, "BLOB_UPLOAD_UNKNOWN")


def test_mount_from_readable(writer: Account) -> None:
    """POST ?mount=&from= links a blob the caller may pull: 201 and readable."""
    source = writer.repository("source")
    target = writer.repository("target")
    digest = push_blob(writer.client, source, DATA)
    response = writer.client.post(
        f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source}
    )
    assert response.status_code == 201
    assert response.headers["location"] == f"/v2/{target}/blobs/{digest}"
    assert response.headers["docker-content-digest"] == digest
    assert_blob(writer, target, DATA, digest)


@pytest.mark.parametrize("source", ["missing", "wrong-repository", "none", "invalid"])
def test_mount_falls_back(writer: Account, source: str) -> None:
    """A mount that cannot be served opens an ordinary session (202) instead."""
    target = writer.repository("target")
    digest = digest_of(os.urandom(32))
    params = {"mount": digest}
    if source == "wrong-repository":
        params["mount"] = push_blob(writer.client, writer.repository(), DATA)
        params["from"] = writer.repository("empty")
    elif source == "missing":
        params["from"] = writer.repository("source")
    elif source == "invalid":
        params["from"] = "Not//A/Name"
    response = writer.client.post(f"/v2/{target}/blobs/uploads/", params=params)
    assert response.status_code == 202
    assert response.headers["location"].startswith(f"/v2/{target}/blobs/uploads/")
    assert_error(
        writer.client.get(f"/v2/{target}/blobs/{params['mount']}"), 404, "BLOB_UNKNOWN"
    )


def test_mount_from_unreadable(
    writer: Account, new_account: Callable[..., Account]
) -> None:
    """A mount from another customer's repository falls back to a session."""
    other = new_account()
    source = other.repository("secret")
    data = b"another customer's layer"
    digest = push_blob(other.client, source, data)
    target = writer.repository("target")
    response = writer.client.post(
        f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source}
    )
    assert response.status_code == 202
    assert response.headers["location"].startswith(f"/v2/{target}/blobs/uploads/")
    assert_error(writer.client.get(f"/v2/{target}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


def test_mount_invalid_digest(writer: Account) -> None:
    """A malformed mount digest gets 400 DIGEST_INVALID."""
    target = writer.repository()
    response = writer.client.post(
        f"/v2/{target}/blobs/uploads/", params={"mount": "sha256:xyz", "from": target}
    )
    assert_error(response, 400, "DIGEST_INVALID")


def test_reader_cannot_upload(reader: Account, writer: Account) -> None:
    """A reader gets 403 DENIED on POST, PATCH and PUT."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    post = reader.client.post(f"/v2/{repository}/blobs/uploads/")
    assert_error(post, 403, "DENIED")
    assert_error(reader.client.patch(location, content=b"x"), 403, "DENIED")
    digest = digest_of(b"x")
    monolithic = reader.client.post(
        f"/v2/{repository}/blobs/uploads/", params={"digest": digest}, content=b"x"
    )
    assert_error(monolithic, 403, "DENIED")
    put = reader.client.put(location, params={"digest": digest}, content=b"x")
    assert_error(put, 403, "DENIED")
    assert_error(
        reader.client.get(f"/v2/{repository}/blobs/{digest}"), 404, "BLOB_UNKNOWN"
    )


def test_large_chunks_hash(writer: Account) -> None:
    """Several MiB in uneven streamed chunks commit under the right digest."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    hasher = hashlib.sha256()
    for size in (3 << 20, 1, (1 << 20) + 7):
        chunk = os.urandom(size)
        hasher.update(chunk)
        response = writer.client.patch(location, content=chunk)
        location = response.headers["location"]
    digest = f"sha256:{hasher.hexdigest()}"
    done = writer.client.put(location, params={"digest": digest})
    assert done.status_code == 201
    head = writer.client.head(f"/v2/{repository}/blobs/{digest}")
    assert head.headers["content-length"] == str((4 << 20) + 8)


def token_client(
    server: ServerProcess, account: Account, scopes: list[str]
) -> httpx.Client:
    """Return a client that sends a bearer token asked for `scopes`."""
    response = httpx.get(
        f"{server.url}/token",
        params=[("service", "moorage"), *(("scope", scope) for scope in scopes)],
        auth=(account.login, account.password),
    )
    assert response.status_code == 200
    headers = {"Authorization": f"Bearer {response.json()['token']}"}
    return httpx.Client(base_url=server.url, headers=headers)


@pytest.mark.parametrize(
    ("source_scope", "status"),
    [("repository:{source}:pull", 201), (None, 202)],
    ids=["token-covers-source", "token-lacks-source"],
)
def test_mount_with_token(
    server: ServerProcess, writer: Account, source_scope: str | None, status: int
) -> None:
    """A bearer mount needs the source in the token, else it opens a session."""
    source = writer.repository("source")
    target = writer.repository("target")
    digest = push_blob(writer.client, source, os.urandom(64))
    scopes = [f"repository:{target}:pull,push"]
    if source_scope is not None:
        scopes.append(source_scope.format(source=source))
    with token_client(server, writer, scopes) as client:
        response = client.post(
            f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source}
        )
    assert response.status_code == status
    visible = writer.client.head(f"/v2/{target}/blobs/{digest}").status_code
    assert visible == (200 if status == 201 else 404)


def test_mount_challenge_names_source(server: ServerProcess, writer: Account) -> None:
    """A mount challenge requests pull on the source, so its token mounts."""
    source = writer.repository("source")
    target = writer.repository("target")
    digest = push_blob(writer.client, source, os.urandom(64))
    url = f"{server.url}/v2/{target}/blobs/uploads/"
    params = {"mount": digest, "from": source}
    challenge = httpx.post(url, params=params)
    assert challenge.status_code == 401
    header = challenge.headers["www-authenticate"]
    scope = f"repository:{target}:pull,push repository:{source}:pull"
    assert f'scope="{scope}"' in header
    with token_client(server, writer, [scope]) as client:
        response = client.post(url, params=params)
    assert response.status_code == 201


def test_token_space_separated_scopes(server: ServerProcess, writer: Account) -> None:
    """One scope parameter may hold several scopes separated by spaces."""
    source = writer.repository("source")
    target = writer.repository("target")
    digest = push_blob(writer.client, source, os.urandom(64))
    scope = f"repository:{target}:pull,push repository:{source}:pull"
    with token_client(server, writer, [scope]) as client:
        response = client.post(
            f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source}
        )
    assert response.status_code == 201


def test_same_content_stored_once(server: ServerProcess, writer: Account) -> None:
    """The same bytes pushed to two repositories are stored in one file."""
    data = os.urandom(4096)
    first = push_blob(writer.client, writer.repository(), data)
    second_repository = writer.repository()
    location = start_upload(writer.client, second_repository)
    writer.client.put(location, params={"digest": first}, content=data)
    files = list(stored_blob_files(server))
    assert [path.name for path in files].count(first.partition(":")[2]) == 1
    assert not upload_dir(server, upload_id(location)).exists()
    assert_blob(writer, second_repository, data, first)


def test_parallel_pushes(server: ServerProcess, writer: Account) -> None:
    """Sixteen pushes of one shared blob and of images, eight at a time, succeed."""
    repository = writer.repository("parallel")
    shared = os.urandom(100_000)

    def push(index: int) -> list[int]:
        # An httpx.Client may be shared between threads; it pools connections.
        client = writer.client
        statuses = [
            client.post(
                f"/v2/{repository}/blobs/uploads/",
                params={"digest": digest_of(shared)},
                content=shared,
            ).status_code
        ]
        image = make_image(f"parallel-{index}")
        for blob in image.blobs:
            push_blob(client, repository, blob)
        for tag in (f"v{index}", "latest"):
            response = put_manifest(client, repository, tag, image.manifest)
            statuses.append(response.status_code)
        return statuses

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(push, range(16)))
    assert all(statuses == [201, 201, 201] for statuses in results), results
    tags = writer.client.get(f"/v2/{repository}/tags/list").json()["tags"]
    assert len(tags) == 17
    assert_blob(writer, repository, shared, digest_of(shared))
    assert_storage_consistent(server)
