"""Blobs at rest are encrypted: nothing readable on disk, tampering fails loudly."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, select, update

from moorage.api.middleware import STORAGE_INTEGRITY_CODE
from moorage.audit.events import BLOB_PULL, FAILURE, STORAGE_INTEGRITY
from moorage.db.audit_store import AuditFilter
from moorage.db.schema import (
    audit_events,
    data_key_wraps,
    manifests,
    object_paths,
    repositories,
    server_keys,
    signing_keys,
)
from moorage.services import Services
from moorage.storage.encryption.driver import LONE_READ_RUN_BYTES
from tests.support.audit import wait_for_events
from tests.support.identity import add_robot, bearer, get_token
from tests.support.images import (
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_MANIFEST,
    LayerTar,
    OciLayout,
    add_image,
    host_architecture,
)
from tests.support.receivers import wait_until
from tests.support.registry import Account, open_account
from tests.support.server import (
    ADMIN_LOGIN,
    ADMIN_PASSWORD,
    ServerProcess,
    running_server,
    unique,
)

SEGMENT = 64 * 1024
SEALED = SEGMENT + 28
HEADER = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A registry of this module's own: the tamper tests damage stored blobs, which
    the storage checks of other modules would then report. The shared
    `admin_client` fixture picks this server up."""
    with running_server(tmp_path_factory.mktemp("encrypted")) as process:
        yield process


def marker_blob(marker: bytes, size: int) -> bytes:
    """Incompressible bytes with `marker` repeated through them."""
    unit = marker + os.urandom(997)
    return (unit * (size // len(unit) + 1))[:size]


def push_blob(client: httpx.Client, repository: str, data: bytes, chunks: int) -> str:
    """Upload `data` in `chunks` PATCH requests and return its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    response = client.post(f"/v2/{repository}/blobs/uploads/")
    assert response.status_code == 202
    location = response.headers["Location"]
    step = -(-len(data) // chunks)
    for index in range(chunks):
        piece = data[index * step : (index + 1) * step]
        response = client.patch(
            location,
            content=piece,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{index * step}-{index * step + len(piece) - 1}",
            },
        )
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
    response = client.put(location, params={"digest": digest})
    assert response.status_code == 201, response.text
    return digest


def stored_file(server: ServerProcess, digest: str) -> Path:
    hex_digest = digest.split(":", 1)[1]
    return (
        server.data_dir / "storage" / "blobs" / "sha256" / hex_digest[:2] / hex_digest
    )


def raw_storage_contains(server: ServerProcess, needle: bytes) -> list[Path]:
    found = []
    for path in (server.data_dir / "storage").rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            found.append(path)
    return found


def test_pushed_blob_is_not_stored_in_plaintext(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """A blob uploaded in unaligned chunks reads back; no stored file has its marker."""
    marker = f"MARKER-{unique('plain')}".encode()
    data = marker_blob(marker, 5 * SEGMENT + 12345)
    repository = f"{unique('enc')}/blobs"
    digest = push_blob(admin_client, repository, data, chunks=3)
    response = admin_client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Docker-Content-Digest"] == digest
    assert raw_storage_contains(server, marker) == []
    assert stored_file(server, digest).stat().st_size > len(data)


def test_repeated_push_leaves_no_upload_key(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """A second push of a stored blob reads back, and its upload's data and
    data key envelope are deleted after the response."""
    data = marker_blob(b"repeat", 3 * SEGMENT + 7)
    first = f"{unique('enc')}/once"
    digest = push_blob(admin_client, first, data, chunks=2)
    storage = server.data_dir / "storage"

    def files_under(name: str) -> list[Path]:
        return [path for path in (storage / name).rglob("*") if path.is_file()]

    envelopes = len(files_under(".keys"))

    second = f"{unique('enc')}/again"
    assert push_blob(admin_client, second, data, chunks=2) == digest

    assert wait_until(lambda: not files_under("trash"))
    assert len(files_under(".keys")) == envelopes
    for repository in (first, second):
        response = admin_client.get(f"/v2/{repository}/blobs/{digest}")
        assert response.status_code == 200
        assert response.content == data


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, SEGMENT - 1),
        (SEGMENT, 2 * SEGMENT - 1),
        (SEGMENT - 1, SEGMENT),
        (3 * SEGMENT + 5, 5 * SEGMENT + 100),
    ],
)
def test_range_reads_over_http(
    admin_client: httpx.Client, start: int, end: int
) -> None:
    """Range requests at and across segment boundaries return the exact bytes."""
    data = marker_blob(b"range", 5 * SEGMENT + 200)
    repository = f"{unique('enc')}/ranges"
    digest = push_blob(admin_client, repository, data, chunks=1)
    response = admin_client.get(
        f"/v2/{repository}/blobs/{digest}", headers={"Range": f"bytes={start}-{end}"}
    )
    assert response.status_code == 206
    assert response.content == data[start : end + 1]


def test_blob_of_several_runs_over_http(admin_client: httpx.Client) -> None:
    """A blob of several runs, which the server reads, decrypts and sends in
    worker threads, comes back whole and by ranges across run boundaries. Runs
    are `LONE_READ_RUN_BYTES` long for a read that is alone, as here."""
    run = LONE_READ_RUN_BYTES
    data = marker_blob(b"runs", 3 * run + 12345)
    repository = f"{unique('enc')}/runs"
    digest = push_blob(admin_client, repository, data, chunks=2)
    response = admin_client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == digest[7:]
    for start, end in [(run - 7, 2 * run + 9), (SEGMENT + 3, 3 * run + 100)]:
        response = admin_client.get(
            f"/v2/{repository}/blobs/{digest}",
            headers={"Range": f"bytes={start}-{end}"},
        )
        assert response.status_code == 206
        assert response.content == data[start : end + 1]


def stream_into(client: httpx.Client, url: str, received: bytearray) -> None:
    """GET `url`, which must return status 200, and append the body to `received`."""
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += chunk


@pytest.mark.parametrize("damage", ["flip-later-run", "truncate-later-run"])
def test_tampered_later_run_breaks_the_pull(
    admin_client: httpx.Client, server: ServerProcess, damage: str
) -> None:
    """Damage in a later run, after the response has started, cuts the response
    short before any byte of the damaged segment's run, and is logged."""
    run = LONE_READ_RUN_BYTES
    data = marker_blob(b"late", 3 * run)
    repository = f"{unique('enc')}/late"
    digest = push_blob(admin_client, repository, data, chunks=1)
    path = stored_file(server, digest)
    raw = bytearray(path.read_bytes())
    bad = 2 * (run // SEGMENT) + 3  # a segment of the third run
    if damage == "flip-later-run":
        raw[HEADER + bad * SEALED + 50] ^= 0x01
    else:
        del raw[HEADER + bad * SEALED + 50 :]
    path.write_bytes(bytes(raw))
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        stream_into(admin_client, f"/v2/{repository}/blobs/{digest}", received)
    assert len(received) <= 2 * run
    assert bytes(received) == data[: len(received)]
    assert "storage integrity error" in server.log()


@pytest.mark.parametrize("damage", ["flip-first", "flip-later", "truncate", "swap"])
def test_tampered_blob_fails_the_pull(
    admin_client: httpx.Client, server: ServerProcess, damage: str
) -> None:
    """A flipped byte, a cut file or swapped segments fail the pull with 500,
    are logged, and recorded as storage.integrity."""
    data = marker_blob(b"tamper", 4 * SEGMENT + 10)
    repository = f"{unique('enc')}/tamper"
    digest = push_blob(admin_client, repository, data, chunks=1)
    path = stored_file(server, digest)
    raw = bytearray(path.read_bytes())
    if damage == "flip-first":
        raw[HEADER + 40] ^= 0x80
    elif damage == "flip-later":
        raw[HEADER + 3 * SEALED + 40] ^= 0x01
    elif damage == "truncate":
        del raw[HEADER + 4 * SEALED :]
    else:
        first = raw[HEADER + SEALED : HEADER + 2 * SEALED]
        raw[HEADER + SEALED : HEADER + 2 * SEALED] = raw[
            HEADER + 2 * SEALED : HEADER + 3 * SEALED
        ]
        raw[HEADER + 2 * SEALED : HEADER + 3 * SEALED] = first
    path.write_bytes(bytes(raw))
    # The blob fits in the first run, which is authenticated before the
    # response starts: the client gets an error, not a cut stream.
    response = admin_client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 500
    assert "integrity check" in response.json()["errors"][0]["message"]
    assert f'"path": "blobs/sha256/{digest[7:9]}/{digest[7:]}"' in server.log()
    assert "storage integrity error" in server.log()
    assert_integrity_recorded(server, digest)
    pulls = wait_for_events(
        server,
        AuditFilter(repository=repository, action=BLOB_PULL),
        lambda found: len(found) >= 1,
    )
    assert [event.event.outcome for event in pulls] == [FAILURE]
    assert pulls[0].event.reason == STORAGE_INTEGRITY_CODE


def assert_integrity_recorded(server: ServerProcess, digest: str) -> None:
    """The failure is a storage.integrity event and raises a tampering alert."""
    recorded = wait_for_events(
        server,
        AuditFilter(action=STORAGE_INTEGRITY),
        lambda found: any(event.event.digest == digest for event in found),
    )
    ours = [event.event for event in recorded if event.event.digest == digest]
    assert ours
    assert ours[0].outcome == FAILURE
    assert ours[0].reason is not None
    alerts = wait_for_events(
        server,
        AuditFilter(action="alert.tampered_storage"),
        lambda found: any(digest[7:] in (event.event.reason or "") for event in found),
    )
    assert any(digest[7:] in (event.event.reason or "") for event in alerts)


@pytest.mark.parametrize("damage", ["first-run", "later-run"])
def test_tampered_pull_events_name_the_caller(
    admin_client: httpx.Client, server: ServerProcess, damage: str
) -> None:
    """The storage.integrity event and the alert of a robot's pull that hits
    damage carry the robot, its customer, the client's address and user agent,
    and the request id of the pull's own event. Damage in the first run is found
    in a thread of asyncio.to_thread before the response starts, damage in a
    later run in a response body thread while the response is sent."""
    customer = server.add_customer()
    repository = f"{customer}/{unique('tamper')}"
    run = LONE_READ_RUN_BYTES
    size = 4 * SEGMENT + 10 if damage == "first-run" else 3 * run
    digest = push_blob(admin_client, repository, marker_blob(b"caller", size), 1)
    login, secret = add_robot(server, customer, "reader")
    token = get_token(server, login, secret, f"repository:{repository}:pull")
    path = stored_file(server, digest)
    raw = bytearray(path.read_bytes())
    bad = 3 if damage == "first-run" else 2 * (run // SEGMENT) + 3
    raw[HEADER + bad * SEALED + 40] ^= 0x01
    path.write_bytes(bytes(raw))

    headers = {**bearer(token), "User-Agent": "tamper-test/1.0"}
    with httpx.Client(base_url=server.url, headers=headers) as client:
        url = f"/v2/{repository}/blobs/{digest}"
        if damage == "first-run":
            response = client.get(url)
            assert response.status_code == 500
            request_id = response.headers["X-Request-Id"]
        else:
            with client.stream("GET", url) as response:
                assert response.status_code == 200
                request_id = response.headers["X-Request-Id"]
                with pytest.raises(httpx.RemoteProtocolError):
                    for _ in response.iter_bytes():
                        pass

    pulls = wait_for_events(
        server,
        AuditFilter(repository=repository, action=BLOB_PULL),
        lambda found: len(found) >= 1,
    )
    assert [event.event.request_id for event in pulls] == [request_id]
    assert pulls[0].event.actor_account == login
    # Only what reached the client counts: at most the runs before the damage.
    assert (pulls[0].event.bytes or 0) <= bad * SEGMENT
    integrity = wait_for_events(
        server,
        AuditFilter(action=STORAGE_INTEGRITY),
        lambda found: any(event.event.digest == digest for event in found),
    )
    found = [event.event for event in integrity if event.event.digest == digest]
    alerts = wait_for_events(
        server,
        AuditFilter(action="alert.tampered_storage"),
        lambda found: any(digest[7:] in (event.event.reason or "") for event in found),
    )
    found += [
        event.event for event in alerts if digest[7:] in (event.event.reason or "")
    ]
    assert [event.action for event in found] == [
        STORAGE_INTEGRITY,
        "alert.tampered_storage",
    ]
    for event in found:
        assert event.actor_account == login
        assert event.actor_customer == customer
        assert event.request_id == request_id
        assert event.source_address == "127.0.0.1"
        assert event.user_agent == "tamper-test/1.0"
    assert found[0].repository == repository


def assert_pull_fails(
    client: httpx.Client, repository: str, digest: str, headers: dict[str, str]
) -> None:
    """A GET of the blob fails with 500 and serves none of its bytes."""
    response = client.get(f"/v2/{repository}/blobs/{digest}", headers=headers)
    served = len(response.content)
    assert response.status_code == 500, f"{response.status_code}, {served} bytes"
    message = response.json()["errors"][0]["message"]
    assert "integrity check" in message


def object_id_of(server: ServerProcess, digest: str) -> str:
    return stored_file(server, digest).read_bytes()[8:24].hex()


def test_blob_copied_from_another_customer_fails(server: ServerProcess) -> None:
    """A customer's blob file copied over another customer's blob path is not
    served as that blob, by a whole or a range read. The failure is recorded
    as storage.integrity, and the copied blob itself still pulls."""
    acme = open_account(server, server.add_customer(unique("acme")))
    beta = open_account(server, server.add_customer(unique("beta")))
    with acme.client, beta.client:
        secret = marker_blob(b"acme-private", 3 * SEGMENT + 99)
        own = marker_blob(b"beta-own", 2 * SEGMENT + 5)
        acme_repository = acme.repository("raw")
        beta_repository = beta.repository("raw")
        acme_digest = push_blob(acme.client, acme_repository, secret, chunks=2)
        beta_digest = push_blob(beta.client, beta_repository, own, chunks=1)

        stored_file(server, beta_digest).write_bytes(
            stored_file(server, acme_digest).read_bytes()
        )

        ranges = [{}, {"Range": "bytes=0-99"}, {"Range": f"bytes={SEGMENT + 5}-"}]
        for headers in ranges:
            assert_pull_fails(beta.client, beta_repository, beta_digest, headers)
        assert_integrity_recorded(server, beta_digest)
        entries = [
            entry
            for entry in log_entries(server, "storage integrity error")
            if beta_digest[7:] in str(entry.get("path"))
        ]
        assert entries
        assert "copied or moved here" in str(entries[0]["reason"])
        pulls = wait_for_events(
            server,
            AuditFilter(repository=beta_repository, action=BLOB_PULL),
            lambda found: len(found) >= len(ranges),
        )
        assert {event.event.outcome for event in pulls} == {FAILURE}

        response = acme.client.get(f"/v2/{acme_repository}/blobs/{acme_digest}")
        assert response.status_code == 200
        assert response.content == secret


def test_blobs_swapped_within_a_repository_fail(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """Two blob files of one owner swapped in storage both fail their pulls."""
    repository = f"{unique('enc')}/swapped"
    first = marker_blob(b"first", SEGMENT + 1)
    second = marker_blob(b"second", SEGMENT + 1)
    first_digest = push_blob(admin_client, repository, first, chunks=1)
    second_digest = push_blob(admin_client, repository, second, chunks=1)
    first_file = stored_file(server, first_digest)
    second_file = stored_file(server, second_digest)
    first_bytes = first_file.read_bytes()
    first_file.write_bytes(second_file.read_bytes())
    second_file.write_bytes(first_bytes)
    for digest in (first_digest, second_digest):
        assert_pull_fails(admin_client, repository, digest, {})
        assert_pull_fails(admin_client, repository, digest, {"Range": "bytes=3-9"})
        assert_integrity_recorded(server, digest)


def test_copied_blob_is_not_mounted_and_push_repairs(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """A blob path that contains a copy of another blob is not mounted
    elsewhere. A push of the blob replaces the copy, so the blob pulls again."""
    source = f"{unique('enc')}/origin"
    other = marker_blob(b"other", SEGMENT + 3)
    data = marker_blob(b"victim", 2 * SEGMENT + 3)
    other_digest = push_blob(admin_client, source, other, chunks=1)
    digest = push_blob(admin_client, source, data, chunks=1)
    stored_file(server, digest).write_bytes(
        stored_file(server, other_digest).read_bytes()
    )

    target = f"{unique('enc')}/mounted"
    response = admin_client.post(
        f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source}
    )
    assert response.status_code == 202
    assert_integrity_recorded(server, digest)

    assert push_blob(admin_client, target, data, chunks=2) == digest
    for repository in (source, target):
        response = admin_client.get(f"/v2/{repository}/blobs/{digest}")
        assert response.status_code == 200
        assert response.content == data
    response = admin_client.get(f"/v2/{source}/blobs/{other_digest}")
    assert response.content == other


def test_mount_and_repush_read_back(server: ServerProcess) -> None:
    """Blobs mounted into another repository, and pushed again to a third, are
    read back from each; every copy is recorded at its blob path only."""
    acme = open_account(server, server.add_customer(unique("acme")))
    with acme.client:
        read_back_mounted(server, acme)


def read_back_mounted(server: ServerProcess, acme: Account) -> None:
    data = marker_blob(b"mounted", 2 * SEGMENT + 17)
    first = acme.repository("first")
    digest = push_blob(acme.client, first, data, chunks=3)
    second = acme.repository("second")
    response = acme.client.post(
        f"/v2/{second}/blobs/uploads/", params={"mount": digest, "from": first}
    )
    assert response.status_code == 201
    third = acme.repository("third")
    assert push_blob(acme.client, third, data, chunks=1) == digest
    for repository in (first, second, third):
        response = acme.client.get(f"/v2/{repository}/blobs/{digest}")
        assert response.status_code == 200
        assert response.content == data
        response = acme.client.get(
            f"/v2/{repository}/blobs/{digest}",
            headers={"Range": f"bytes={SEGMENT - 2}-{SEGMENT + 2}"},
        )
        assert response.status_code == 206
        assert response.content == data[SEGMENT - 2 : SEGMENT + 3]

    async def recorded(services: Services) -> list[str]:
        async with services.engine.connect() as connection:
            result = await connection.execute(
                select(object_paths.c.path).where(
                    object_paths.c.object_id == object_id_of(server, digest)
                )
            )
            return [row.path for row in result]

    assert server.run_admin(recorded) == [f"blobs/sha256/{digest[7:9]}/{digest[7:]}"]


def test_blobs_without_recorded_paths(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """Blobs stored before paths were recorded still pull, their paths are
    recorded at start-up, and a copy among them then fails its pull."""
    repository = f"{unique('enc')}/older"
    first = marker_blob(b"older-1", SEGMENT + 11)
    second = marker_blob(b"older-2", SEGMENT + 12)
    digests = [
        push_blob(admin_client, repository, data, chunks=1) for data in (first, second)
    ]
    object_ids = [object_id_of(server, digest) for digest in digests]

    async def forget_paths(services: Services) -> int:
        async with services.engine.begin() as connection:
            result = await connection.execute(
                delete(object_paths).where(object_paths.c.object_id.in_(object_ids))
            )
        return int(result.rowcount)

    async def count_paths(services: Services) -> int:
        async with services.engine.connect() as connection:
            found = await connection.scalars(
                select(object_paths.c.object_id).where(
                    object_paths.c.object_id.in_(object_ids)
                )
            )
            return len(list(found))

    assert server.run_admin(forget_paths) == 2
    for digest, data in zip(digests, (first, second), strict=True):
        response = admin_client.get(f"/v2/{repository}/blobs/{digest}")
        assert response.status_code == 200
        assert response.content == data

    server.restart()
    assert wait_until(lambda: server.run_admin(count_paths) == 2)
    stored_file(server, digests[1]).write_bytes(
        stored_file(server, digests[0]).read_bytes()
    )
    assert_pull_fails(admin_client, repository, digests[1], {})
    assert_integrity_recorded(server, digests[1])


def test_unrecorded_copy_over_recorded_blob_fails(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """A blob without a recorded path, copied over a blob path where another
    object is recorded, fails its pull there."""
    repository = f"{unique('enc')}/mixed"
    older = marker_blob(b"unrecorded", SEGMENT + 21)
    newer = marker_blob(b"recorded", SEGMENT + 22)
    older_digest = push_blob(admin_client, repository, older, chunks=1)
    newer_digest = push_blob(admin_client, repository, newer, chunks=1)
    older_id = object_id_of(server, older_digest)

    async def forget_path(services: Services) -> None:
        async with services.engine.begin() as connection:
            await connection.execute(
                delete(object_paths).where(object_paths.c.object_id == older_id)
            )

    server.run_admin(forget_path)
    stored_file(server, newer_digest).write_bytes(
        stored_file(server, older_digest).read_bytes()
    )
    assert_pull_fails(admin_client, repository, newer_digest, {})
    assert_integrity_recorded(server, newer_digest)
    entries = [
        entry
        for entry in log_entries(server, "storage integrity error")
        if newer_digest[7:] in str(entry.get("path"))
    ]
    assert "no recorded path" in str(entries[0]["reason"])


def test_upload_data_replaced_fails_the_chunk(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """An upload whose data file is replaced by a stored blob's file fails its
    next chunk instead of continuing that blob."""
    repository = f"{unique('enc')}/upload"
    stored = push_blob(admin_client, repository, marker_blob(b"kept", 9000), 1)
    response = admin_client.post(f"/v2/{repository}/blobs/uploads/")
    location = response.headers["Location"]
    response = admin_client.patch(
        location,
        content=b"x" * 5000,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 202
    upload_id = response.headers["Docker-Upload-UUID"]
    data = server.data_dir / "storage" / "uploads" / upload_id / "data"
    data.write_bytes(stored_file(server, stored).read_bytes())
    response = admin_client.patch(
        response.headers["Location"],
        content=b"y" * 100,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 500
    assert "copied or moved here" in server.log()


def log_entries(server: ServerProcess, event: str) -> list[dict[str, object]]:
    """Return the server's JSON log lines whose event is `event`."""
    entries = (
        json.loads(line) for line in server.log().splitlines() if line[:1] == "{"
    )
    return [entry for entry in entries if entry.get("event") == event]


def test_lost_wraps_fail_the_pull_loudly(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """A blob whose data key wraps vanished without shredding fails its pull with a
    server error, an ERROR log line and a failed audit event, not BLOB_UNKNOWN."""
    data = marker_blob(b"lost", 2 * SEGMENT + 10)
    repository = f"{unique('enc')}/lost"
    digest = push_blob(admin_client, repository, data, chunks=1)
    object_id = stored_file(server, digest).read_bytes()[8:24].hex()

    async def lose_wraps(services: Services) -> int:
        async with services.engine.begin() as connection:
            result = await connection.execute(
                delete(data_key_wraps).where(data_key_wraps.c.object_id == object_id)
            )
        return int(result.rowcount)

    assert server.run_admin(lose_wraps) == 1
    response = admin_client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 500
    assert response.json()["errors"][0]["code"] == "UNKNOWN"

    def logged() -> list[dict[str, object]]:
        return [
            entry
            for entry in log_entries(server, "storage integrity error")
            if digest[7:] in str(entry.get("path"))
        ]

    assert wait_until(lambda: bool(logged()))
    assert [entry["level"] for entry in logged()] == ["error"]
    assert "wraps were lost" in str(logged()[0]["reason"])
    assert not log_entries(server, "object data key unavailable")

    async def pull_events(services: Services) -> list[tuple[str, str]]:
        async with services.engine.connect() as connection:
            result = await connection.execute(
                select(audit_events.c.action, audit_events.c.outcome).where(
                    audit_events.c.digest == digest,
                    audit_events.c.action == "blob.pull",
                )
            )
            return [(row.action, row.outcome) for row in result]

    assert wait_until(lambda: bool(server.run_admin(pull_events)))
    assert server.run_admin(pull_events) == [("blob.pull", "failure")]


@pytest.mark.clients
def test_skopeo_round_trip_is_byte_identical(
    server: ServerProcess, tmp_path: Path
) -> None:
    """An image pushed and pulled with skopeo comes back with the pushed digests."""
    layout = OciLayout(tmp_path / "image")
    tar = LayerTar()
    tar.add_file("marker.bin", marker_blob(b"skopeo", 300 * 1024))
    layer = layout.add_layer(tar.to_bytes(), MEDIA_TYPE_OCI_LAYER)
    manifest = add_image(layout, [layer], host_architecture())
    layout.tag(manifest, "v1")
    target = f"docker://{server.address}/{unique('enc')}/marker:v1"
    creds = f"{ADMIN_LOGIN}:{ADMIN_PASSWORD}"
    pushed = tmp_path / "pushed.digest"
    skopeo_copy(
        "--dest-tls-verify=false",
        f"--dest-creds={creds}",
        f"--digestfile={pushed}",
        f"oci:{layout.path}:v1",
        target,
    )
    skopeo_copy(
        "--src-tls-verify=false",
        f"--src-creds={creds}",
        target,
        f"oci:{tmp_path / 'back'}:v1",
    )
    back = OciLayout(tmp_path / "back")
    pulled = back.read_index()["manifests"][0]["digest"]
    assert pulled == pushed.read_text().strip()
    layers = json.loads(back.read_blob(pulled))["layers"]
    assert gzip.decompress(back.read_blob(layers[0]["digest"])) == layer.blob.data


def skopeo_copy(*args: str) -> None:
    subprocess.run(
        ["skopeo", "copy", *args], check=True, capture_output=True, timeout=120
    )


def push_manifest(client: httpx.Client, repository: str, marker: str) -> bytes:
    """Push a config blob and a manifest whose annotation contains `marker`."""
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    config_digest = push_blob(client, repository, config, chunks=1)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [],
            "annotations": {"note": marker},
        }
    ).encode()
    response = client.put(
        f"/v2/{repository}/manifests/v1",
        content=manifest,
        headers={"Content-Type": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 201, response.text
    return manifest


def stored_manifest(server: ServerProcess, repository: str) -> bytes:
    """The raw `content` column of the repository's manifest."""

    async def query(services: Services) -> bytes:
        async with services.engine.connect() as connection:
            return bytes(
                await connection.scalar(
                    select(manifests.c.content)
                    .join(repositories, repositories.c.id == manifests.c.repository_id)
                    .where(repositories.c.name == repository)
                )
            )

    return server.run_admin(query)


def overwrite_manifest(server: ServerProcess, repository: str, content: bytes) -> None:
    async def change(services: Services) -> None:
        async with services.engine.begin() as connection:
            repository_id = await connection.scalar(
                select(repositories.c.id).where(repositories.c.name == repository)
            )
            await connection.execute(
                update(manifests)
                .where(manifests.c.repository_id == repository_id)
                .values(content=content)
            )

    server.run_admin(change)


def test_manifest_content_is_encrypted_in_the_database(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """The database stores sealed manifest bytes; clients get the pushed bytes."""
    marker = f"MANIFEST-MARKER-{unique('m')}"
    repository = f"{unique('enc')}/manifests"
    manifest = push_manifest(admin_client, repository, marker)
    stored = stored_manifest(server, repository)
    assert marker.encode() not in stored
    # Sealed for the vendor, whose key covers namespaces that no customer owns.
    assert stored.startswith(b"MRGMF1\x00\x06vendor")
    response = admin_client.get(
        f"/v2/{repository}/manifests/v1",
        headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.content == manifest
    assert response.headers["Content-Length"] == str(len(manifest))


def test_manifest_under_database_key_is_resealed(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """A row sealed with the database data key, as before owner keys, serves as
    it is, and the server seals it for its owner in the background at start."""
    repository = f"{unique('enc')}/legacy"
    manifest = push_manifest(admin_client, repository, "legacy")
    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"

    async def seal_with_database_key(services: Services) -> bytes:
        assert services.identity.codec is not None
        return services.identity.codec.seal(manifest, digest)

    legacy = server.run_admin(seal_with_database_key)
    assert legacy.startswith(b"MRGDB1")
    overwrite_manifest(server, repository, legacy)

    def pull() -> bytes:
        response = admin_client.get(
            f"/v2/{repository}/manifests/v1",
            headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
        )
        assert response.status_code == 200, response.text
        return response.content

    assert pull() == manifest
    server.restart()
    assert wait_until(lambda: stored_manifest(server, repository).startswith(b"MRGMF1"))
    assert pull() == manifest


def test_tampered_manifest_fails(
    admin_client: httpx.Client, server: ServerProcess
) -> None:
    """An altered manifest row fails the pull with an error and is logged."""
    repository = f"{unique('enc')}/manifests"
    manifest = push_manifest(admin_client, repository, "tamper")
    stored = bytearray(stored_manifest(server, repository))
    stored[-5] ^= 0x01
    overwrite_manifest(server, repository, bytes(stored))
    response = admin_client.get(
        f"/v2/{repository}/manifests/v1",
        headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 500
    assert "failed its integrity check" in response.json()["errors"][0]["message"]
    assert "content does not authenticate" in server.log()
    assert_integrity_recorded(server, f"sha256:{hashlib.sha256(manifest).hexdigest()}")


def test_token_signing_key_is_encrypted(server: ServerProcess) -> None:
    """The token-signing private key is stored sealed, not as a PEM."""

    async def query(services: Services) -> list[str]:
        async with services.engine.connect() as connection:
            rows = await connection.execute(select(signing_keys.c.private_key))
            return [row.private_key for row in rows]

    stored = server.run_admin(query)
    assert stored
    assert all(key.startswith("sealed:") for key in stored)
    assert not any("PRIVATE KEY" in key for key in stored)


def test_server_keys_are_encrypted(server: ServerProcess) -> None:
    """The server keys (the HMAC key of robot secrets and others) are sealed."""

    async def query(services: Services) -> list[bytes]:
        async with services.engine.connect() as connection:
            rows = await connection.execute(select(server_keys.c.material))
            return [bytes(row.material) for row in rows]

    stored = server.run_admin(query)
    assert len(stored) >= 2
    assert all(material.startswith(b"MRGDB1\x00") for material in stored)
