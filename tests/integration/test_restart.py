"""Upload sessions survive a server restart and finish with a verified digest."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.database import create_database, drop_database
from tests.support.registry import (
    Account,
    assert_error,
    assert_storage_consistent,
    basic_header,
    digest_of,
    make_image,
    open_account,
    push_image,
    start_upload,
    upload_dir,
)
from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def restartable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A registry of this module's own, which its tests restart or kill."""
    data_dir = tmp_path_factory.mktemp("restartable")
    process = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    process.start()
    yield process
    process.stop()
    drop_database(process.database_url)


DATA = os.urandom(5 * 1024 * 1024 + 17)
HALF = len(DATA) // 2


def test_upload_resumes_after_restart(restartable: ServerProcess) -> None:
    """A session started before a restart takes the rest and verifies its digest.

    The running sha256 of the session is lost with the process, so the server
    has to hash the stored first half again.
    """
    account = open_account(restartable, restartable.add_customer())
    try:
        resume_after_restart(restartable, account)
    finally:
        account.client.close()


def resume_after_restart(server: ServerProcess, account: Account) -> None:
    repository = account.repository()
    location = start_upload(account.client, repository)
    first = account.client.patch(location, content=DATA[:HALF])
    assert first.headers["range"] == f"0-{HALF - 1}"

    server.restart()

    status = account.client.get(location)
    assert status.status_code == 204
    assert status.headers["range"] == f"0-{HALF - 1}"
    rest = DATA[HALF:]
    response = account.client.patch(
        location,
        content=rest,
        headers={"Content-Range": f"{HALF}-{len(DATA) - 1}"},
    )
    assert response.headers["range"] == f"0-{len(DATA) - 1}"
    wrong = account.client.put(location + "x", params={"digest": digest_of(DATA)})
    assert_error(wrong, 404, "BLOB_UPLOAD_UNKNOWN")
    digest = digest_of(DATA)
    done = account.client.put(location, params={"digest": digest})
    assert done.status_code == 201
    assert done.headers["docker-content-digest"] == digest
    got = account.client.get(f"/v2/{repository}/blobs/{digest}")
    assert got.content == DATA


def test_wrong_digest_after_restart(restartable: ServerProcess) -> None:
    """After a restart the digest is computed from storage, so a wrong one fails."""
    account = open_account(restartable, restartable.add_customer())
    with account.client as client:
        location = start_upload(client, account.repository())
        client.patch(location, content=DATA)
        restartable.restart()
        response = client.put(location, params={"digest": digest_of(DATA[:-1])})
        assert_error(response, 400, "DIGEST_INVALID")
        upload_id = location.rsplit("/", 1)[1]
        uploads = restartable.data_dir / "storage" / "uploads" / upload_id
        assert not uploads.exists()


def test_content_survives_restart(restartable: ServerProcess) -> None:
    """Blobs, manifests and tags pushed before a restart are served after it."""
    account = open_account(restartable, restartable.add_customer())
    with account.client as client:
        repository = account.repository()
        image = make_image("durable")
        push_image(client, repository, image, "v1")
        restartable.restart()
        assert client.get(f"/v2/{repository}/manifests/v1").content == image.manifest
        for blob in image.blobs:
            got = client.get(f"/v2/{repository}/blobs/{digest_of(blob)}")
            assert got.content == blob


def test_crash_mid_patch(restartable: ServerProcess) -> None:
    """A server killed during a PATCH keeps only the acknowledged bytes.

    The killed request had written part of its body to the session's file; the
    committed blob must not contain those bytes.
    """
    account = open_account(restartable, restartable.add_customer())
    with account.client as client:
        repository = account.repository()
        location = start_upload(client, repository)
        client.patch(location, content=DATA[:1000])
        data_file = upload_dir(restartable, location.rsplit("/", 1)[1]) / "data"
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: {restartable.address}\r\n"
            + basic_header(account.login, account.password)
            + f"Content-Length: {len(DATA)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", restartable.port)) as sock:
            sock.sendall(head.encode() + DATA[: 3 * 1024 * 1024])
            wait_until(lambda: data_file.stat().st_size > 1000)
            restartable.stop(signal.SIGKILL)
        restartable.start()

        assert client.get(location).headers["range"] == "0-999"
        digest = digest_of(DATA[:1000])
        assert client.put(location, params={"digest": digest}).status_code == 201
        assert client.get(f"/v2/{repository}/blobs/{digest}").content == DATA[:1000]
    assert_storage_consistent(restartable)


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
