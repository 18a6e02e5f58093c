"""Garbage collection (`moorage gc`) against a running server: what it frees,
what it keeps, and pushes that race it.

The races are made deterministic with the collector's hooks: a hook that runs
inside the collector's transaction, right after its locks, starts a push and
returns only once the push has had time to reach the database; a hook inside
a manifest push's transaction lets a collector run while the push holds its
locks.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import text

from moorage.config import Settings
from moorage.db import stats
from moorage.db.gc_store import GcStore
from moorage.services import Services, open_services
from moorage.storage.gc import GarbageCollector, GcReport
from tests.support.database import create_database, drop_database
from tests.support.registry import (
    OCI_MANIFEST,
    Account,
    Image,
    assert_error,
    assert_storage_consistent,
    descriptor,
    digest_of,
    make_image,
    make_index,
    open_account,
    push_blob,
    push_image,
    put_manifest,
    start_upload,
    stored_blob_files,
    to_json,
)
from tests.support.server import ServerProcess, unique

T = TypeVar("T")
# How long a hook waits for the push it started to reach the database, where
# it then waits for the collector's locks.
SETTLE_SECONDS = 2.0
LONG_AGO = timedelta(days=2)
# A server's start, which takes longer than the default 30 s on a loaded
# machine (a migration of a new PostgreSQL database alone took 32 s).
START_SECONDS = 120


@pytest.fixture(scope="module", params=["encrypted", "plaintext"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp(f"gc-{request.param}")
    env = {"MOORAGE_LOGIN_FREE_FAILURES_PER_ADDRESS": "100000"}
    if request.param == "plaintext":
        env["MOORAGE_ENCRYPTION"] = "false"
    process = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env=env,
    )
    process.start(timeout=START_SECONDS)
    try:
        yield process
    finally:
        process.stop()
        drop_database(process.database_url)


@pytest.fixture
def account(server: ServerProcess) -> Iterator[Account]:
    opened = open_account(server, server.add_customer(), "maintainer")
    yield opened
    opened.client.close()


def _settings(server: ServerProcess) -> Settings:
    settings = server.settings()
    return settings.model_copy(update={"log_level": "warning"})


def _with_services(
    server: ServerProcess, action: Callable[[Services], Awaitable[T]]
) -> T:
    async def main() -> T:
        services = await open_services(_settings(server))
        try:
            return await action(services)
        finally:
            await services.close()

    return asyncio.run(main())


def _sql(server: ServerProcess, statement: str, **values: Any) -> list[Any]:
    async def run(services: Services) -> list[Any]:
        async with services.engine.begin() as connection:
            result = await connection.execute(text(statement), values)
            return list(result.all()) if result.returns_rows else []

    return _with_services(server, run)


def _age(server: ServerProcess, digests: list[str]) -> None:
    """Make blobs and their links look as if they were pushed and released
    long ago, so that a grace period of an hour has passed for them, and
    every manifest as if pushed long ago."""
    old = (datetime.now(UTC) - LONG_AGO).replace(tzinfo=None)
    _sql(server, "UPDATE manifests SET created_at = :old", old=old)
    for digest in digests:
        _sql(
            server,
            "UPDATE blobs SET created_at = :old WHERE digest = :digest",
            old=old,
            digest=digest,
        )
        _sql(
            server,
            "UPDATE blobs SET released_at = :old "
            "WHERE digest = :digest AND released_at IS NOT NULL",
            old=old,
            digest=digest,
        )
        _sql(
            server,
            "UPDATE repository_blobs SET created_at = :old WHERE digest = :digest",
            old=old,
            digest=digest,
        )


def _blob_file(server: ServerProcess, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":", 1)
    return (
        server.data_dir / "storage" / "blobs" / algorithm / hex_digest[:2] / hex_digest
    )


def _stored_bytes(server: ServerProcess) -> int:
    return sum(path.stat().st_size for path in stored_blob_files(server))


def _customer_bytes(server: ServerProcess, customer: str) -> int:
    """Return the customer's figure of the moorage_stored_bytes metric."""

    async def read(services: Services) -> int:
        totals = await stats.stored_bytes_by_customer(services.engine)
        return totals.get(customer, 0)

    return _with_services(server, read)


def _gc(server: ServerProcess, *args: str) -> str:
    completed = server.run_command("gc", *args)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def _blob_rows(server: ServerProcess, digest: str) -> int:
    rows = _sql(server, "SELECT count(*) FROM blobs WHERE digest = :d", d=digest)
    return int(rows[0][0])


def _links(server: ServerProcess, digest: str) -> int:
    rows = _sql(
        server, "SELECT count(*) FROM repository_blobs WHERE digest = :d", d=digest
    )
    return int(rows[0][0])


def _image(layers: list[bytes]) -> Image:
    """An OCI image whose layers are `layers`, with a config of its own."""
    config = to_json({"architecture": "amd64", "os": "linux", "seed": unique("c")})
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [
            descriptor("application/vnd.oci.image.layer.v1.tar", layer)
            for layer in layers
        ],
    }
    return Image(to_json(document), OCI_MANIFEST, [config, *layers])


def _pull_blob(client: httpx.Client, repository: str, digest: str) -> bytes:
    response = client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200, response.text
    return response.content


def test_gc_frees_the_space_of_an_offboarded_customer(server: ServerProcess) -> None:
    """Offboarding and then `moorage gc` delete the customer's own blob files;
    a blob another customer uses stays and pulls byte-identical."""
    leaving = open_account(server, server.add_customer(), "writer")
    staying = open_account(server, server.add_customer(), "writer")
    shared = os.urandom(200_000)
    own = [os.urandom(300_000), os.urandom(150_000)]
    image = _image([shared, *own])
    repository = leaving.repository()
    push_image(leaving.client, repository, image, "1.0")
    other = staying.repository()
    kept = _image([shared, os.urandom(1000)])
    push_image(staying.client, other, kept, "1.0")

    completed = server.run_command(
        "customer", "offboard", leaving.customer, "--delete-now", "--confirm"
    )
    assert completed.returncode == 0, completed.stderr
    assert "garbage collection" in completed.stdout
    own_digests = [digest_of(blob) for blob in own]
    assert all(_blob_file(server, digest).exists() for digest in own_digests)
    before = _stored_bytes(server)

    # The deletion released the blobs just now: a grace period keeps them.
    assert "deleted 0 untagged manifests, 0 unused blob links and 0 blobs" in _gc(
        server, "--grace-hours", "1"
    )
    assert _stored_bytes(server) == before
    out = _gc(server, "--grace-hours", "0")
    assert "blobs (" in out
    freed = before - _stored_bytes(server)
    assert freed >= sum(len(blob) for blob in own)
    for digest in own_digests:
        assert not _blob_file(server, digest).exists()
        assert _blob_rows(server, digest) == 0
    assert _blob_file(server, digest_of(shared)).exists()
    assert _pull_blob(staying.client, other, digest_of(shared)) == shared
    for blob in kept.blobs:
        assert _pull_blob(staying.client, other, digest_of(blob)) == blob
    assert_storage_consistent(server)
    leaving.client.close()
    staying.client.close()


def test_grace_period_dry_run_and_audit(
    server: ServerProcess, account: Account
) -> None:
    """A blob pushed without a manifest is kept for the grace period; a dry run
    changes nothing; a run records one gc.run event with its counts."""
    repository = account.repository()
    data = os.urandom(100_000)
    digest = push_blob(account.client, repository, data)

    _gc(server, "--grace-hours", "1")
    assert _links(server, digest) == 1
    assert _blob_file(server, digest).exists()

    _age(server, [digest])
    files = sorted(str(path) for path in stored_blob_files(server))
    out = _gc(server, "--grace-hours", "1", "--dry-run")
    assert "would delete" in out
    assert _links(server, digest) == 1
    assert sorted(str(path) for path in stored_blob_files(server)) == files

    stored_before = _customer_bytes(server, account.customer)
    # The link goes first, which releases the blob: it waits a grace period.
    out = _gc(server, "--grace-hours", "1")
    assert _links(server, digest) == 0
    # moorage_stored_bytes counts linked blobs: this one no longer.
    assert _customer_bytes(server, account.customer) == stored_before - len(data)
    assert _blob_rows(server, digest) == 1
    assert "within the grace period" in out
    _age(server, [digest])
    # The blob's row is past its grace period, but its file was put in place
    # within it (this test ran in seconds), which keeps the blob too.
    _gc(server, "--grace-hours", "1")
    assert _blob_rows(server, digest) == 1
    _gc(server, "--grace-hours", "0")
    assert _blob_rows(server, digest) == 0
    assert not _blob_file(server, digest).exists()
    response = account.client.head(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 404

    events = _sql(
        server,
        "SELECT reason, bytes FROM audit_events WHERE action = 'gc.run' "
        "ORDER BY seq DESC",
    )
    # One event per run, dry runs excepted: the newest deleted the blob.
    assert len(events) >= 5
    assert (
        "deleted 0 untagged manifests, 0 unused blob links and 1 blobs"
        in (events[0][0])
    )
    assert events[0][1] == len(data)
    assert_storage_consistent(server)


def test_delete_untagged(server: ServerProcess, account: Account) -> None:
    """--delete-untagged deletes untagged manifests and their referrers, and
    keeps tagged ones with their referrers; the blobs go in a later run."""
    repository = account.repository()
    tagged = make_image(unique("tagged"))
    push_image(account.client, repository, tagged, "1.0")
    signature = make_image(unique("sig"), subject=tagged, artifact_type="a/b")
    push_image(account.client, repository, signature)
    untagged = make_image(unique("untagged"))
    push_image(account.client, repository, untagged)
    orphan = make_image(unique("orphan-sig"), subject=untagged, artifact_type="a/b")
    push_image(account.client, repository, orphan)
    # The children of a tagged index stay; those of an untagged one go.
    kept_children = [make_image(unique("kept-child")) for _ in range(2)]
    gone_children = [make_image(unique("gone-child")) for _ in range(2)]
    for child in kept_children + gone_children:
        push_image(account.client, repository, child)
    push_image(account.client, repository, make_index(kept_children), "multi")
    gone_index = make_index(gone_children)
    push_image(account.client, repository, gone_index)
    _age(server, [])

    out = _gc(server, "--grace-hours", "1", "--delete-untagged")
    assert "untagged manifests" in out
    client = account.client
    for image in (tagged, signature):
        assert (
            client.head(f"/v2/{repository}/manifests/{image.digest}").status_code == 200
        )
    for image in kept_children:
        response = client.head(f"/v2/{repository}/manifests/{image.digest}")
        assert response.status_code == 200
    for image in (*gone_children, gone_index):
        response = client.head(f"/v2/{repository}/manifests/{image.digest}")
        assert response.status_code == 404
    for image in (untagged, orphan):
        assert (
            client.head(f"/v2/{repository}/manifests/{image.digest}").status_code == 404
        )
    # Their blobs were released now, so a grace period keeps them.
    layer = digest_of(untagged.blobs[1])
    assert _blob_rows(server, layer) == 1
    _gc(server, "--grace-hours", "0")
    _gc(server, "--grace-hours", "0")
    assert _blob_rows(server, layer) == 0
    assert not _blob_file(server, layer).exists()
    for blob in tagged.blobs:
        assert _pull_blob(client, repository, digest_of(blob)) == blob
    assert_storage_consistent(server)


def _run_in_thread(work: Callable[[], T]) -> tuple[threading.Thread, list[Any]]:
    """Start `work` in a thread; its result or exception lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _collect(
    server: ServerProcess,
    grace: timedelta,
    prepare: Callable[[GarbageCollector], None],
) -> GcReport:
    async def run(services: Services) -> GcReport:
        gc = GarbageCollector(services.registry, GcStore(services.engine), grace)
        prepare(gc)
        return await gc.collect()

    return _with_services(server, run)


def test_manifest_push_waiting_for_gc_is_rejected(
    server: ServerProcess, account: Account
) -> None:
    """A manifest push that comes while the collector holds the lock of the
    link it deletes fails with MANIFEST_BLOB_UNKNOWN; no manifest is left
    naming a blob that is gone."""
    repository = account.repository()
    image = make_image(unique("race-a"))
    for blob in image.blobs:
        push_blob(account.client, repository, blob)
    _age(server, [digest_of(blob) for blob in image.blobs])
    pushes: list[tuple[threading.Thread, list[Any]]] = []

    async def after_lock(step: str) -> None:
        if step != "links" or pushes:
            return
        pushes.append(
            _run_in_thread(
                lambda: put_manifest(
                    account.client, repository, "1.0", image.manifest, OCI_MANIFEST
                )
            )
        )
        await asyncio.sleep(SETTLE_SECONDS)
        assert pushes[0][0].is_alive(), "the push did not wait for the collector"

    def prepare(gc: GarbageCollector) -> None:
        gc.store.after_lock = after_lock

    report = _collect(server, timedelta(hours=1), prepare)
    assert report.links >= len(image.blobs)
    thread, outcome = pushes[0]
    thread.join(60)
    response = outcome[0]
    assert isinstance(response, httpx.Response)
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert account.client.head(f"/v2/{repository}/manifests/1.0").status_code == 404


def test_gc_waiting_for_manifest_push_keeps_the_blobs(
    server: ServerProcess, account: Account
) -> None:
    """A collector that comes while a manifest push holds its locks finds the
    new references afterwards and deletes nothing the manifest names."""
    repository = account.repository()
    image = make_image(unique("race-b"))
    for blob in image.blobs:
        push_blob(account.client, repository, blob)
    digests = [digest_of(blob) for blob in image.blobs]
    _age(server, digests)
    reached = threading.Event()
    reports: list[tuple[threading.Thread, list[Any]]] = []

    def start_gc() -> None:
        async def pause(step: str) -> None:
            if step == "links":
                await asyncio.to_thread(reached.wait, 60)

        def prepare(gc: GarbageCollector) -> None:
            gc.pause = pause

        reports.append(
            _run_in_thread(lambda: _collect(server, timedelta(hours=1), prepare))
        )

    def after_hold() -> None:
        # The push holds its locks: let the collector go on, and give it time
        # to reach its own.
        reached.set()
        time.sleep(SETTLE_SECONDS)
        assert reports[0][0].is_alive(), "the collector did not wait for the push"

    async def push(services: Services) -> None:
        start_gc()
        services.registry.store.after_hold = after_hold
        await services.registry.put_manifest(
            repository, "1.0", OCI_MANIFEST, image.manifest
        )

    _with_services(server, push)
    thread, outcome = reports[0]
    thread.join(60)
    report = outcome[0]
    assert isinstance(report, GcReport), report
    assert report.links == 0
    for digest in digests:
        assert _links(server, digest) == 1
        assert _blob_file(server, digest).exists()
    for blob in image.blobs:
        assert _pull_blob(account.client, repository, digest_of(blob)) == blob


@pytest.mark.parametrize("size", [1000, 400_000])
def test_upload_racing_gc_stores_its_own_copy(
    server: ServerProcess, account: Account, size: int
) -> None:
    """An upload that found the blob stored, while the collector deletes it,
    stores its own copy after its link: the blob's row never outlives its
    file. Both the in-memory upload and one through a session's data."""
    first = account.repository()
    data = os.urandom(size)
    digest = push_blob(account.client, first, data)
    _age(server, [digest])
    # Drop the link, which releases the blob; then age the release.
    _collect(server, timedelta(hours=1), lambda gc: None)
    assert _links(server, digest) == 0
    _age(server, [digest])
    second = account.repository()
    # The session starts before the run: on SQLite, starting one writes, and
    # would wait for the collector's write lock.
    location = start_upload(account.client, second)
    uploads: list[tuple[threading.Thread, list[Any]]] = []

    def finish() -> int:
        response = account.client.put(
            location,
            params={"digest": digest},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return response.status_code

    async def after_lock(step: str) -> None:
        if step != "blobs" or uploads:
            return
        assert _blob_file(server, digest).exists()
        uploads.append(_run_in_thread(finish))
        await asyncio.sleep(SETTLE_SECONDS)
        assert uploads[0][0].is_alive(), "the upload did not wait for the collector"

    def prepare(gc: GarbageCollector) -> None:
        gc.store.after_lock = after_lock

    report = _collect(server, timedelta(0), prepare)
    assert report.blobs >= 1
    thread, outcome = uploads[0]
    thread.join(60)
    assert outcome == [201], outcome
    assert _blob_rows(server, digest) == 1
    assert _blob_file(server, digest).exists()
    assert _pull_blob(account.client, second, digest) == data
    # The upload found the stored copy before the collector took it, and
    # stored its own after its link (the server writes its log behind).
    deadline = time.monotonic() + 10
    while "stored copy removed by garbage collection" not in server.log():
        assert time.monotonic() < deadline, "the upload did not store its copy"
        time.sleep(0.2)
    assert_storage_consistent(server)


class _FailingSecondClaim:
    """The real blob store, whose second file claim fails."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.claims = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    async def claim(self, *args: Any) -> Any:
        self.claims += 1
        if self.claims == 2:
            raise RuntimeError("claim failed")
        return await self.driver.claim(*args)


def test_failed_blob_step_puts_files_back(
    server: ServerProcess, account: Account
) -> None:
    """When the blob step fails after it moved a file, the file goes back and
    the run fails with the original error, not an internal one."""
    repository = account.repository()
    data = [os.urandom(2000), os.urandom(3000)]
    digests = [push_blob(account.client, repository, blob) for blob in data]
    _age(server, digests)
    _collect(server, timedelta(hours=1), lambda gc: None)
    _age(server, digests)

    def prepare(gc: GarbageCollector) -> None:
        gc.driver = _FailingSecondClaim(gc.driver)  # type: ignore[assignment]

    with pytest.raises(RuntimeError, match="claim failed"):
        _collect(server, timedelta(0), prepare)
    for digest in digests:
        assert _blob_rows(server, digest) == 1
        assert _blob_file(server, digest).exists()
    assert_storage_consistent(server)


def test_delete_after_runs_when_due(server: ServerProcess) -> None:
    """`customer offboard --delete-after` schedules the deletion; `customer
    show` shows it; `moorage gc` runs it when due, with its event; `customer
    resume` cancels another one; the server runs a due one at start."""
    leaving = open_account(server, server.add_customer(), "writer")
    repository = leaving.repository()
    push_image(leaving.client, repository, make_image(unique("due")), "1.0")
    completed = server.run_command(
        "customer", "offboard", leaving.customer, "--delete-after", "30d"
    )
    assert completed.returncode == 0, completed.stderr
    assert "customer resume" in completed.stdout
    shown = server.run_command("customer", "show", leaving.customer)
    due = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d")
    assert f"repositories deleted after {due}" in shown.stdout

    # Not due yet: gc keeps the repositories.
    _gc(server, "--grace-hours", "1")
    assert (
        _sql(server, "SELECT count(*) FROM repositories WHERE name = :n", n=repository)[
            0
        ][0]
        == 1
    )
    past = (datetime.now(UTC) - timedelta(minutes=1)).replace(tzinfo=None)
    _sql(
        server,
        "UPDATE customers SET delete_after = :past WHERE slug = :slug",
        past=past,
        slug=leaving.customer,
    )
    out = _gc(server, "--grace-hours", "1")
    assert f"deleted the repositories of customer {leaving.customer}" in out
    assert (
        _sql(server, "SELECT count(*) FROM repositories WHERE name = :n", n=repository)[
            0
        ][0]
        == 0
    )
    shown = server.run_command("customer", "show", leaving.customer)
    assert "deleted after" not in shown.stdout
    reasons = [
        row[0]
        for row in _sql(
            server,
            "SELECT reason FROM audit_events WHERE action = :a AND repository = :r",
            a="customer.delete_repositories",
            r=f"{leaving.customer}/",
        )
    ]
    assert len(reasons) == 1
    assert "scheduled for" in reasons[0]
    assert "1 repositories" in reasons[0]

    # Resume cancels a scheduled deletion.
    resumed = open_account(server, server.add_customer(), "writer")
    server.run_command("customer", "offboard", resumed.customer, "--delete-after", "2h")
    completed = server.run_command("customer", "resume", resumed.customer)
    assert completed.returncode == 0, completed.stderr
    assert "is cancelled" in completed.stdout
    shown = server.run_command("customer", "show", resumed.customer)
    assert "deleted after" not in shown.stdout

    # The server's maintenance loop runs a due deletion (at start, then every
    # ten minutes).
    later = open_account(server, server.add_customer(), "writer")
    other = later.repository()
    push_image(later.client, other, make_image(unique("server")), "1.0")
    server.run_command("customer", "offboard", later.customer, "--delete-after", "1h")
    _sql(
        server,
        "UPDATE customers SET delete_after = :past WHERE slug = :slug",
        past=past,
        slug=later.customer,
    )
    server.stop()
    server.start(timeout=START_SECONDS)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        count = _sql(
            server, "SELECT count(*) FROM repositories WHERE name = :n", n=other
        )[0][0]
        if count == 0:
            break
        time.sleep(0.5)
    assert count == 0
    for opened in (leaving, resumed, later):
        opened.client.close()


@pytest.mark.parametrize("hours", ["-1", "1e9", "nan", "inf"])
def test_rejects_an_invalid_grace_period(server: ServerProcess, hours: str) -> None:
    completed = server.run_command("gc", f"--grace-hours={hours}")
    assert completed.returncode == 2
    assert "give 0 or more hours, below 1000000" in completed.stderr


def test_new_manifest_after_gc(server: ServerProcess, account: Account) -> None:
    """A push after a run that deleted the image's blobs uploads them again."""
    repository = account.repository()
    image = make_image(unique("again"))
    for blob in image.blobs:
        push_blob(account.client, repository, blob)
    digests = [digest_of(blob) for blob in image.blobs]
    _age(server, digests)
    _gc(server, "--grace-hours", "1")
    _gc(server, "--grace-hours", "0")
    assert all(_blob_rows(server, digest) == 0 for digest in digests)
    response = put_manifest(account.client, repository, "1.0", image.manifest)
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    push_image(account.client, repository, image, "1.0")
    for blob in image.blobs:
        assert _pull_blob(account.client, repository, digest_of(blob)) == blob
    assert_storage_consistent(server)


def test_server_collects_on_schedule(tmp_path: Path) -> None:
    """With gc_interval_hours set, the server's processes collect on their own,
    one at a time, each run with its gc.run event."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env={
            "MOORAGE_ENCRYPTION": "false",
            # Every 1.8 seconds, with no grace period.
            "MOORAGE_GC_INTERVAL_HOURS": "0.0005",
            "MOORAGE_GC_GRACE_HOURS": "0",
            "MOORAGE_WORKERS": "2",
        },
    )
    process.start(timeout=START_SECONDS)
    try:
        opened = open_account(process, process.add_customer(), "writer")
        digest = push_blob(opened.client, opened.repository(), os.urandom(5000))
        deadline = time.monotonic() + 60
        while _blob_rows(process, digest) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _blob_rows(process, digest) == 0
        assert not _blob_file(process, digest).exists()
        runs = _sql(
            process,
            "SELECT outcome FROM audit_events WHERE action = 'gc.run'",
        )
        assert runs
        assert {row[0] for row in runs} == {"success"}
        opened.client.close()
    finally:
        process.stop()
        drop_database(process.database_url)
    assert "Traceback" not in process.log()


def test_repushed_manifest_renews_its_time(
    server: ServerProcess, account: Account
) -> None:
    """A client that pushes the children of an index again (as `skopeo copy
    --all` does) has the grace period to push the index, even when the
    children were stored, untagged, long ago."""
    repository = account.repository()
    children = [make_image(unique("again-child")) for _ in range(2)]
    for child in children:
        push_image(account.client, repository, child)
    _age(server, [])
    # The children are pushed again, and a run comes before the index.
    for child in children:
        push_image(account.client, repository, child)
    _gc(server, "--grace-hours", "1", "--delete-untagged")
    index = make_index(children)
    push_image(account.client, repository, index, "multi")
    for child in children:
        response = account.client.get(f"/v2/{repository}/manifests/{child.digest}")
        assert response.status_code == 200
        assert response.content == child.manifest
    assert_storage_consistent(server)


def test_one_run_without_grace_frees_a_deleted_image(
    server: ServerProcess, account: Account
) -> None:
    """With --grace-hours 0, one run frees the blobs of a manifest deleted
    through the API, and of one that --delete-untagged deletes, although the
    run itself releases them (it deletes their links, or the manifest)."""
    client = account.client
    repository = account.repository()
    deleted = _image([os.urandom(50_000)])
    push_image(client, repository, deleted, "deleted")
    untagged = _image([os.urandom(40_000)])
    push_image(client, repository, untagged)
    kept = _image([os.urandom(30_000)])
    push_image(client, repository, kept, "kept")
    response = client.delete(f"/v2/{repository}/manifests/{deleted.digest}")
    assert response.status_code == 202

    out = _gc(server, "--grace-hours", "0", "--delete-untagged")
    assert "within the grace period" not in out
    for blob in (*deleted.blobs, *untagged.blobs):
        digest = digest_of(blob)
        assert _blob_rows(server, digest) == 0, digest
        assert not _blob_file(server, digest).exists()
    for blob in kept.blobs:
        assert _pull_blob(client, repository, digest_of(blob)) == blob
    assert_storage_consistent(server)


def test_keeps_a_pushed_non_distributable_layer(
    server: ServerProcess, account: Account
) -> None:
    """A non-distributable layer need not be pushed, but when it was, the
    manifest that names it keeps it, as it keeps its other layers."""
    client = account.client
    repository = account.repository()
    layer = os.urandom(20_000)
    config = to_json({"architecture": "amd64", "os": "linux", "seed": unique("nd")})
    for blob in (layer, config):
        push_blob(client, repository, blob)
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [
            descriptor(
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", layer
            )
        ],
    }
    response = put_manifest(client, repository, "1.0", to_json(document), OCI_MANIFEST)
    assert response.status_code == 201, response.text

    _gc(server, "--grace-hours", "0")
    assert _pull_blob(client, repository, digest_of(layer)) == layer
    assert _pull_blob(client, repository, digest_of(config)) == config
    assert_storage_consistent(server)
