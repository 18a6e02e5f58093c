"""Bad input never corrupts storage: truncated bodies, wrong digests, bad sizes.

Truncated bodies are sent over a raw socket that announces more bytes than it
sends and then closes, as a client that dies mid-upload does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.registry import (
    Account,
    assert_error,
    assert_storage_consistent,
    basic_header,
    digest_of,
    logged_requests,
    make_image,
    push_blob,
    push_image,
    put_manifest,
    raw_request,
    read_stored,
    start_upload,
    to_json,
    upload_dir,
    wait_for_request,
)
from tests.support.server import ServerProcess

DATA = os.urandom(3 * 1024 * 1024)
# Where truncated bodies stop: past the 1 MiB the server buffers before writing.
CUT = 2 * 1024 * 1024
# The error code in the request log of a request whose client went away.
DISCONNECTED = "CLIENT_DISCONNECTED"


def upload_dirs(server: ServerProcess) -> set[Path]:
    root = server.data_dir / "storage" / "uploads"
    return set(root.iterdir()) if root.exists() else set()


def send_truncated(
    server: ServerProcess,
    account: Account,
    method: str,
    path: str,
    announced: int,
    body: bytes,
    extra_headers: str = "",
) -> None:
    """Announce `announced` bytes, send `body` (fewer), close, await the log line."""
    url_path = path.split("?", 1)[0]
    before = len(logged_requests(server, url_path, DISCONNECTED))
    head = (
        f"{method} {path} HTTP/1.1\r\n"
        f"Host: {server.address}\r\n"
        + basic_header(account.login, account.password)
        + "Content-Type: application/octet-stream\r\n"
        + f"Content-Length: {announced}\r\n"
        + extra_headers
        + "\r\n"
    )
    raw_request(server, head, body)
    wait_for_request(server, url_path, before + 1, DISCONNECTED)


@pytest.fixture(autouse=True, scope="module")
def storage_checked(server: ServerProcess) -> Iterator[None]:
    """After this module's tests, storage must be consistent."""
    yield
    assert_storage_consistent(server)


def test_truncated_monolithic_post(server: ServerProcess, writer: Account) -> None:
    """A POST ?digest= cut short stores nothing and leaves no upload behind."""
    repository = writer.repository()
    digest = digest_of(DATA)
    before = upload_dirs(server)
    path = f"/v2/{repository}/blobs/uploads/?digest={digest}"
    send_truncated(server, writer, "POST", path, len(DATA), DATA[:CUT])
    assert upload_dirs(server) <= before
    response = writer.client.get(f"/v2/{repository}/blobs/{digest}")
    assert_error(response, 404, "BLOB_UNKNOWN")
    assert_storage_consistent(server)


@pytest.mark.parametrize("with_range", [False, True], ids=["streamed", "chunked"])
def test_truncated_patch(
    server: ServerProcess, writer: Account, with_range: bool
) -> None:
    """A PATCH cut short appends nothing; the client can resume and finish."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    first = writer.client.patch(location, content=DATA[:1000])
    assert first.headers["range"] == "0-999"
    extra = f"Content-Range: 1000-{len(DATA) - 1}\r\n" if with_range else ""
    send_truncated(
        server,
        writer,
        "PATCH",
        location,
        len(DATA) - 1000,
        DATA[1000:CUT],
        extra,
    )
    status = writer.client.get(location)
    assert status.headers["range"] == "0-999"
    data_file = upload_dir(server, location.rsplit("/", 1)[1]) / "data"
    assert read_stored(server, data_file) == DATA[:1000]
    rest = writer.client.patch(location, content=DATA[1000:])
    assert rest.headers["range"] == f"0-{len(DATA) - 1}"
    done = writer.client.put(location, params={"digest": digest_of(DATA)})
    assert done.status_code == 201
    got = writer.client.get(f"/v2/{repository}/blobs/{digest_of(DATA)}")
    assert got.content == DATA


def test_truncated_put(server: ServerProcess, writer: Account) -> None:
    """A PUT whose last chunk is cut short commits nothing; a retry succeeds."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.patch(location, content=DATA[:1000])
    digest = digest_of(DATA)
    send_truncated(
        server,
        writer,
        "PUT",
        f"{location}?digest={digest}",
        len(DATA) - 1000,
        DATA[1000:CUT],
    )
    assert_error(
        writer.client.get(f"/v2/{repository}/blobs/{digest}"), 404, "BLOB_UNKNOWN"
    )
    assert writer.client.get(location).headers["range"] == "0-999"
    done = writer.client.put(location, params={"digest": digest}, content=DATA[1000:])
    assert done.status_code == 201


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_wrong_digest_put(
    server: ServerProcess, writer: Account, algorithm: str
) -> None:
    """A PUT whose digest does not match gets DIGEST_INVALID and drops the upload."""
    repository = writer.repository()
    location = start_upload(writer.client, repository)
    writer.client.patch(location, content=DATA)
    wrong = digest_of(DATA + b"x", algorithm)
    response = writer.client.put(location, params={"digest": wrong})
    assert_error(response, 400, "DIGEST_INVALID")
    assert not upload_dir(server, location.rsplit("/", 1)[1]).exists()
    assert_error(writer.client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    for digest in (wrong, digest_of(DATA, algorithm)):
        blob = writer.client.get(f"/v2/{repository}/blobs/{digest}")
        assert_error(blob, 404, "BLOB_UNKNOWN")


def test_wrong_digest_post(server: ServerProcess, writer: Account) -> None:
    """A monolithic POST with a wrong digest stores nothing at all."""
    repository = writer.repository()
    before = upload_dirs(server)
    wrong = digest_of(b"not the data")
    response = writer.client.post(
        f"/v2/{repository}/blobs/uploads/", params={"digest": wrong}, content=DATA
    )
    assert_error(response, 400, "DIGEST_INVALID")
    assert upload_dirs(server) <= before
    assert_error(
        writer.client.get(f"/v2/{repository}/blobs/{wrong}"), 404, "BLOB_UNKNOWN"
    )


def test_wrong_digest_keeps_existing(writer: Account) -> None:
    """A failed upload claiming an existing digest leaves that blob intact."""
    repository = writer.repository()
    digest = push_blob(writer.client, repository, DATA)
    response = writer.client.post(
        f"/v2/{repository}/blobs/uploads/", params={"digest": digest}, content=b"evil"
    )
    assert_error(response, 400, "DIGEST_INVALID")
    assert writer.client.get(f"/v2/{repository}/blobs/{digest}").content == DATA


def test_unsupported_digest_put(writer: Account) -> None:
    """A PUT naming an unsupported algorithm gets 400 and the session stays."""
    location = start_upload(writer.client, writer.repository())
    writer.client.patch(location, content=b"abc")
    response = writer.client.put(location, params={"digest": "md5:" + "0" * 32})
    assert_error(response, 400, "UNSUPPORTED")
    assert writer.client.get(location).headers["range"] == "0-2"


def test_range_length_mismatch(writer: Account) -> None:
    """Content-Length that disagrees with Content-Range gets SIZE_INVALID."""
    location = start_upload(writer.client, writer.repository())
    response = writer.client.patch(
        location,
        content=DATA[:100],
        headers={"Content-Range": "0-199", "Content-Type": "application/octet-stream"},
    )
    assert_error(response, 400, "SIZE_INVALID")
    assert writer.client.get(location).headers["range"] == "0-0"


@pytest.mark.parametrize("header", ["bytes=0-10", "10", "a-b", "5-2"])
def test_bad_content_range(writer: Account, header: str) -> None:
    """A malformed Content-Range is rejected and appends nothing."""
    location = start_upload(writer.client, writer.repository())
    response = writer.client.patch(
        location, content=b"0123456789a", headers={"Content-Range": header}
    )
    assert response.status_code in {400, 416}
    assert response.json()["errors"][0]["code"] in {
        "BLOB_UPLOAD_INVALID",
        "RANGE_INVALID",
    }
    assert writer.client.get(location).headers["range"] == "0-0"


def test_bad_content_length(server: ServerProcess, writer: Account) -> None:
    """A non-numeric Content-Length is rejected before anything is stored."""
    location = start_upload(writer.client, writer.repository())
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {server.address}\r\n"
        + basic_header(writer.login, writer.password)
        + "Content-Length: 3x\r\nConnection: close\r\n\r\n"
    )
    answer = raw_request(server, head, b"abc")
    assert answer.startswith(b"HTTP/1.1 400")
    assert writer.client.get(location).headers["range"] == "0-0"


def test_huge_streamed_manifest(writer: Account) -> None:
    """A manifest over the limit sent without Content-Length still gets 413."""
    repository = writer.repository()

    def body() -> Iterator[bytes]:
        yield b'{"schemaVersion":2,"annotations":{"x":"'
        for _ in range(5):
            yield b"y" * (1024 * 1024)
        yield b'"}}'

    response = writer.client.put(
        f"/v2/{repository}/manifests/huge",
        content=body(),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert_error(response, 413, "SIZE_INVALID")


def test_invalid_manifest_changes_nothing(writer: Account) -> None:
    """A rejected manifest PUT to an existing tag leaves the tag as it was."""
    repository = writer.repository()
    image = make_image("stays")
    for blob in image.blobs:
        push_blob(writer.client, repository, blob)
    put_manifest(writer.client, repository, "v1", image.manifest)
    bad = [b"{", to_json({"schemaVersion": 2, "config": {}, "layers": []})]
    for body in bad:
        response = put_manifest(writer.client, repository, "v1", body)
        assert_error(response, 400, "MANIFEST_INVALID")
    got = writer.client.get(f"/v2/{repository}/manifests/v1")
    assert got.content == image.manifest


def test_deeply_nested_manifest(writer: Account) -> None:
    """A manifest nested past json.loads' recursion limit gets MANIFEST_INVALID."""
    body = b"[" * 100_000 + b"]" * 100_000
    response = put_manifest(writer.client, writer.repository(), "nested", body)
    assert_error(response, 400, "MANIFEST_INVALID")


def open_descriptors(server: ServerProcess) -> int:
    assert server.process is not None
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


# Each connection's descriptor number is free again for the next one, so a
# write meant for an abandoned connection would show up in the next response.
ABANDONED_PULLS = 100


def test_pull_abandoned(server: ServerProcess, writer: Account) -> None:
    """Clients that drop a blob download midway leave no open files behind,
    and the next connection gets its own response from its first byte."""
    repository = writer.repository()
    digest = push_blob(writer.client, repository, DATA)
    path = f"/v2/{repository}/blobs/{digest}"
    before = open_descriptors(server)
    for _ in range(ABANDONED_PULLS):
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {server.address}\r\n"
            + basic_header(writer.login, writer.password)
            + "\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head.encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    wait_for_request(server, path, ABANDONED_PULLS)
    assert open_descriptors(server) <= before + 2
    assert writer.client.get(path).content == DATA


def test_body_longer_than_announced(server: ServerProcess, writer: Account) -> None:
    """Bytes past Content-Length never reach the session.

    The server's HTTP parser may reject the connection (400) before or after the
    announced chunk was appended, so the session contains that chunk or nothing.
    """
    location = start_upload(writer.client, writer.repository())
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {server.address}\r\n"
        + basic_header(writer.login, writer.password)
        + "Content-Length: 10\r\n\r\n"
    )
    raw_request(server, head, b"0123456789" + b"x" * 90)
    wait_for_request(server, "/v2/" + location.split("/v2/", 1)[1], 1)
    size_range = writer.client.get(location).headers["range"]
    data_file = upload_dir(server, location.rsplit("/", 1)[1]) / "data"
    stored = read_stored(server, data_file)
    assert (size_range, stored) in {("0-0", b""), ("0-9", b"0123456789")}


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
def test_lost_session_data(server: ServerProcess, writer: Account, method: str) -> None:
    """A session whose stored data vanished ends with BLOB_UPLOAD_UNKNOWN, not 500."""
    location = start_upload(writer.client, writer.repository())
    writer.client.patch(location, content=b"received before the loss")
    data_file = upload_dir(server, location.rsplit("/", 1)[1]) / "data"
    data_file.unlink()
    if method == "PATCH":
        response = writer.client.patch(location, content=b"more")
    else:
        response = writer.client.put(location, params={"digest": digest_of(b"x")})
    assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(writer.client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert not data_file.parent.exists()


def test_nul_in_lookups(writer: Account) -> None:
    """A NUL (%00) in an upload id, a `last` bound or an artifactType filter
    gets the response for a value that matches nothing, not a 500 from
    PostgreSQL, which cannot compare text with a NUL."""
    repository = writer.repository()
    push_image(writer.client, repository, make_image("nul"), "v1")
    zeros = "sha256:" + "0" * 64
    session = f"/v2/{repository}/blobs/uploads/a%00b"
    for method, path in [
        ("GET", session),
        ("PATCH", session),
        ("PUT", f"{session}?digest={zeros}"),
        ("DELETE", session),
    ]:
        response = writer.client.request(method, path)
        assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")

    tags = writer.client.get(f"/v2/{repository}/tags/list?last=a%00b")
    assert tags.status_code == 200, tags.text
    assert tags.json()["tags"] == ["v1"]
    catalog = writer.client.get(f"/v2/_catalog?last={repository}%00x")
    assert catalog.status_code == 200, catalog.text
    assert repository not in catalog.json()["repositories"]
    referrers = writer.client.get(
        f"/v2/{repository}/referrers/{zeros}?artifactType=a%00b"
    )
    assert referrers.status_code == 200, referrers.text
    assert referrers.json()["manifests"] == []


def test_artifact_type_with_nul_rejected(writer: Account) -> None:
    """A manifest whose artifactType holds a NUL is invalid (400), where
    PostgreSQL failed to store it with a 500."""
    repository = writer.repository()
    image = make_image("nul-type", artifact_type="application/a\u0000b")
    for blob in image.blobs:
        push_blob(writer.client, repository, blob)
    response = put_manifest(
        writer.client, repository, "v1", image.manifest, image.media_type
    )
    assert_error(response, 400, "MANIFEST_INVALID")


def _logged_lines(server: ServerProcess, event: str) -> list[str]:
    return [line for line in server.log().splitlines() if event in line]


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /v2/ HTTP/1.1 extra\r\n",  # a request line with four parts
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS to the HTTP port
    ],
)
def test_invalid_http_request_logged_as_json(
    server: ServerProcess, request_head: bytes
) -> None:
    """A request that is not valid HTTP gets 400 and a JSON log line with the
    source address, without the credentials it carried."""
    secret = base64.b64encode(b"robot:leaked-secret-7f3a").decode()
    event = "Invalid HTTP request received."
    before = len(_logged_lines(server, event))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head + f"Authorization: Basic {secret}\r\n\r\n".encode())
        response = sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 400")

    deadline = time.monotonic() + 5
    while len(_logged_lines(server, event)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = _logged_lines(server, event)
    assert len(lines) == before + 1, lines
    entry = json.loads(lines[-1])
    assert entry["event"] == event
    assert entry["level"] == "warning"
    assert entry["logger"] == "uvicorn.error"
    assert entry["source_address"] == "127.0.0.1"
    assert "timestamp" in entry
    assert secret not in server.log()
    assert "leaked-secret" not in server.log()


def _send_head(server: ServerProcess, head: bytes) -> bytes:
    """Send `head` and return the response, because the server may close the
    connection before `head` ends."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def test_oversized_headers_refused(server: ServerProcess, writer: Account) -> None:
    """Headers over 64 KiB get 431 and a closed connection, also when one header
    line never ends; headers of 32 KiB are served."""
    auth = basic_header(writer.login, writer.password)
    request = f"GET /v2/ HTTP/1.1\r\nHost: {server.address}\r\n{auth}"
    fits = f"{request}X-Padding: {'a' * 32768}\r\nConnection: close\r\n\r\n"
    assert _send_head(server, fits.encode()).startswith(b"HTTP/1.1 200")

    many = "".join(f"X-Padding-{n}: {'a' * 1000}\r\n" for n in range(70))
    answer = _send_head(server, f"{request}{many}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # Many short headers in one piece: their separators count too.
    tiny = "".join(f"X{n}: 1\r\n" for n in range(10_000))
    answer = _send_head(server, f"{request}{tiny}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # 2 MiB of one header value without its line end: refused before it ends.
    endless = f"{request}X-Padding: ".encode() + b"a" * (2 * 1024 * 1024)
    answer = _send_head(server, endless)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert "request line and header fields over 65536 bytes" in server.log()


def _send_head_in_pieces(server: ServerProcess, pieces: list[bytes]) -> bytes:
    """Send each of `pieces` as its own TCP segment and return the response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for piece in pieces:
                sock.sendall(piece)
                # Long enough for the server to read each piece on its own.
                time.sleep(0.2)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


@pytest.mark.parametrize("split", [None, 60_000, 65_536])
def test_oversized_head_logs_only_431(
    server: ServerProcess, writer: Account, split: int | None
) -> None:
    """A head over 64 KiB that ends in the piece crossing the limit gets 431 and
    only the 431 log line, without uvicorn's "Invalid HTTP request received."."""
    auth = basic_header(writer.login, writer.password)
    request = f"GET /v2/ HTTP/1.1\r\nHost: {server.address}\r\n{auth}"
    padding = "".join(f"X-Padding-{n}: {'a' * 1000}\r\n" for n in range(70))
    head = f"{request}{padding}\r\n".encode()
    pieces = [head] if split is None else [head[:split], head[split:]]
    rejected = "request line and header fields over 65536 bytes"
    invalid = "Invalid HTTP request received."
    rejected_before = len(_logged_lines(server, rejected))
    invalid_before = len(_logged_lines(server, invalid))

    answer = _send_head_in_pieces(server, pieces)

    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    deadline = time.monotonic() + 5
    while (
        len(_logged_lines(server, rejected)) == rejected_before
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert len(_logged_lines(server, rejected)) == rejected_before + 1
    assert len(_logged_lines(server, invalid)) == invalid_before


@pytest.mark.parametrize("split", [None, 30_000])
def test_head_limit_is_exact(
    server: ServerProcess, writer: Account, split: int | None
) -> None:
    """A head of exactly 65536 bytes, its final blank line included, is served,
    also with a body in the same piece. One byte more gets 431."""
    auth = basic_header(writer.login, writer.password)
    request = f"PUT /v2/ HTTP/1.1\r\nHost: {server.address}\r\n{auth}"
    request += "Connection: close\r\nContent-Length: 4096\r\n"
    padding_line = "X-Padding: \r\n"
    size = len(request) + len(padding_line) + 2
    padding = "a" * (65536 - size)
    head = f"{request}X-Padding: {padding}\r\n\r\n".encode()
    assert len(head) == 65536
    body = b"b" * 4096
    for extra, expected in [(b"", b"HTTP/1.1 405"), (b"a", b"HTTP/1.1 431")]:
        whole = head[:-4] + extra + b"\r\n\r\n" + body
        pieces = [whole] if split is None else [whole[:split], whole[split:]]
        answer = _send_head_in_pieces(server, pieces)
        assert answer.startswith(expected), (extra, answer[:200])
