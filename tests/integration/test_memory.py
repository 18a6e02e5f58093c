"""Memory stays flat while a 2 GiB blob is pushed and pulled."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator

import pytest

from tests.support.registry import open_account, push_blob, start_upload
from tests.support.server import ServerProcess

MIB = 1024 * 1024
BLOB_SIZE = 2048 * MIB
# Allowed growth of the server's peak resident memory while moving the blob.
MAX_GROWTH = 48 * MIB
BLOCK = os.urandom(MIB)


def peak_rss(server: ServerProcess) -> int:
    """Return the server process's peak resident set size (VmHWM), in bytes."""
    assert server.process is not None
    status = f"/proc/{server.process.pid}/status"
    with open(status) as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"VmHWM missing from {status}")


def blocks(count: int) -> Iterator[bytes]:
    """Yield `count` MiB; each block differs from the others in its first bytes."""
    for index in range(count):
        yield index.to_bytes(8, "big") + BLOCK[8:]


@pytest.mark.slow
def test_large_push_and_pull_flat(fresh_server: ServerProcess) -> None:
    """A streamed 2 GiB push and pull grow the server's peak RSS by < 48 MiB."""
    account = open_account(fresh_server, fresh_server.add_customer())
    repository = account.repository("big")
    try:
        push_blob(account.client, repository, os.urandom(4 * MIB))
        baseline = peak_rss(fresh_server)

        location = start_upload(account.client, repository)
        response = account.client.patch(location, content=blocks(BLOB_SIZE // MIB))
        assert response.headers["range"] == f"0-{BLOB_SIZE - 1}"
        hasher = hashlib.sha256()
        for block in blocks(BLOB_SIZE // MIB):
            hasher.update(block)
        digest = f"sha256:{hasher.hexdigest()}"
        done = account.client.put(
            response.headers["location"], params={"digest": digest}
        )
        assert done.status_code == 201
        after_push = peak_rss(fresh_server)
        assert after_push - baseline < MAX_GROWTH, (baseline, after_push)

        pulled = hashlib.sha256()
        received = 0
        path = f"/v2/{repository}/blobs/{digest}"
        with account.client.stream("GET", path) as stream:
            for chunk in stream.iter_bytes():
                pulled.update(chunk)
                received += len(chunk)
        assert received == BLOB_SIZE
        assert f"sha256:{pulled.hexdigest()}" == digest
        after_pull = peak_rss(fresh_server)
        assert after_pull - baseline < MAX_GROWTH, (baseline, after_pull)
    finally:
        account.client.close()
        fresh_server.stop()
        shutil.rmtree(fresh_server.data_dir / "storage", ignore_errors=True)
