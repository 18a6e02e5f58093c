"""The audit log on a real database: tampering, archives, concurrent writers."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from moorage.audit import alerts
from moorage.audit import log as audit_log
from moorage.audit.events import (
    AUDIT_IMPORT,
    AUTH_LOGIN,
    BLOB_PULL,
    BLOB_PUSH,
    FAILURE,
    MANIFEST_PULL,
    SUCCESS,
    AuditEvent,
    StoredEvent,
    event_hash,
)
from moorage.audit.log import DatabaseAuditLog
from moorage.audit.recorder import AdminRecorder, local_actor
from moorage.config import Settings
from moorage.db.audit_store import ArchiveConflictError, AuditFilter, AuditStore
from moorage.db.schema import utcnow
from moorage.services import Services, open_services
from tests.support.database import create_database, drop_database


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = create_database(data_dir)
    yield Settings(data_dir=data_dir, database_url=url)
    drop_database(url)


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    opened = await open_services(settings)
    yield opened
    await opened.close()


async def _fill(services: Services, count: int) -> None:
    for index in range(count):
        await services.audit.record_now(
            AuditEvent(
                "manifest.pull",
                actor_account="alice",
                actor_customer="acme",
                repository="acme/app",
                reference=f"v{index}",
                bytes=index,
            )
        )


async def _sql(services: Services, *statements: str) -> None:
    async with services.engine.begin() as connection:
        for statement in statements:
            await connection.execute(text(statement))


async def test_verify_intact_log(services: Services) -> None:
    """An untouched log verifies, with its checkpoint."""
    await _fill(services, 10)
    await services.audit.checkpoint()
    result = await services.audit.verify()
    assert result.ok, result.problem
    assert result.events == 10
    assert result.checkpoints >= 1


async def test_verify_names_edited_row(services: Services) -> None:
    """Editing one column of one row makes verify name that event."""
    await _fill(services, 10)
    await _sql(services, "UPDATE audit_events SET bytes = 12345 WHERE seq = 5")
    result = await services.audit.verify()
    assert result.bad_seq == 5
    assert "event 5 was altered" in (result.problem or "")


async def test_verify_names_deleted_row(services: Services) -> None:
    """Deleting one row makes verify name the missing event."""
    await _fill(services, 10)
    await _sql(services, "DELETE FROM audit_events WHERE seq = 6")
    result = await services.audit.verify()
    assert result.bad_seq == 6
    assert "event 6 is missing" in (result.problem or "")


async def test_verify_names_reordered_rows(services: Services) -> None:
    """Swapping two rows' sequence numbers makes verify name the first of them."""
    await _fill(services, 10)
    await _sql(
        services,
        "UPDATE audit_events SET seq = -1 WHERE seq = 3",
        "UPDATE audit_events SET seq = 3 WHERE seq = 4",
        "UPDATE audit_events SET seq = 4 WHERE seq = -1",
    )
    result = await services.audit.verify()
    assert result.bad_seq == 3
    assert "event 3" in (result.problem or "")


async def test_verify_names_deleted_last_row(services: Services) -> None:
    """Deleting the newest row is caught by the head record."""
    await _fill(services, 10)
    await _sql(services, "DELETE FROM audit_events WHERE seq = 10")
    result = await services.audit.verify()
    assert result.bad_seq == 10


async def test_verify_names_rewritten_tail(services: Services) -> None:
    """A consistent rewrite of the newest event, hash and head included, still
    contradicts the signed checkpoint."""
    await _fill(services, 5)
    await services.audit.checkpoint()
    newest = (await services.audit.query(AuditFilter(after_seq=4), 1))[0]
    forged = event_hash(5, replace(newest.event, bytes=7), newest.prev_hash)
    async with services.engine.begin() as connection:
        await connection.execute(
            text("UPDATE audit_events SET bytes = 7, hash = :hash WHERE seq = 5"),
            {"hash": forged},
        )
        await connection.execute(
            text("UPDATE audit_head SET hash = :hash"), {"hash": forged}
        )
    result = await services.audit.verify()
    assert result.bad_seq == 5
    assert "signed checkpoint" in (result.problem or "")


async def test_archive_keeps_chain_verifiable(
    services: Services, tmp_path: Path
) -> None:
    """Archived events leave the table, land in a file, and the chain still verifies."""
    for index in range(6):
        when = utcnow() - timedelta(days=40 - index) if index < 4 else utcnow()
        await services.audit.record_now(AuditEvent("blob.pull", time=when, bytes=index))
    cutoff = utcnow() - timedelta(days=30)
    path = await services.audit.archive(cutoff, tmp_path / "archive")
    assert path is not None
    assert path.name == "audit-000000000001-000000000004.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    remaining = await services.audit.query(AuditFilter(), 100)
    assert [item.seq for item in remaining] == [5, 6, 7]
    assert remaining[-1].event.action == "audit.archive"
    result = await services.audit.verify()
    assert result.ok, result.problem
    assert result.first_seq == 5


async def test_archive_altered_file_fails(services: Services, tmp_path: Path) -> None:
    """An edited archive file makes verify fail."""
    for index in range(3):
        when = utcnow() - timedelta(days=10 - index)
        await services.audit.record_now(AuditEvent("blob.pull", time=when, bytes=index))
    path = await services.audit.archive(utcnow() - timedelta(days=1), tmp_path)
    assert path is not None
    path.write_text(path.read_text().replace('"bytes":1', '"bytes":9'))
    result = await services.audit.verify()
    assert not result.ok
    assert str(path.name) in (result.problem or "")


async def _fill_old(services: Services, count: int) -> None:
    """Append `count` events from ten days ago, in a few transactions."""
    when = utcnow() - timedelta(days=10)
    for start in range(0, count, 250):
        await services.audit.store.append(
            [
                AuditEvent("blob.pull", time=when, bytes=index)
                for index in range(start, min(count, start + 250))
            ]
        )


class _PausedStore:
    """The real audit store of a second process, paused in an archive run until
    `resume` is set. It pauses after the first page of events, or else when it
    reads the range's checkpoints, which comes after every event was read."""

    def __init__(self, store: AuditStore, after_first_page: bool) -> None:
        self.store = store
        self.after_first_page = after_first_page
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()

    async def _pause(self) -> None:
        self.paused.set()
        await self.resume.wait()

    async def iterate(
        self, where: AuditFilter | None = None
    ) -> AsyncIterator[StoredEvent]:
        count = 0
        async for stored in self.store.iterate(where):
            count += 1
            if self.after_first_page and count == 1001:
                await self._pause()
            yield stored

    async def checkpoints(self, *args: Any) -> Any:
        if not self.after_first_page:
            await self._pause()
        return await self.store.checkpoints(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.mark.parametrize("after_first_page", [True, False])
async def test_concurrent_archives_keep_events(
    settings: Settings, tmp_path: Path, after_first_page: bool
) -> None:
    """Two processes archive the same range at once, as the retention job of
    every server worker does at start-up. The second one, paused while it read
    the events or just before it writes its file, finds the range archived and
    raises: one archive file contains every event and the chain verifies."""
    first = await open_services(settings)
    second = await open_services(settings)
    try:
        await _fill_old(first, 1500)
        paused = _PausedStore(second.audit.store, after_first_page)
        second.audit.store = paused  # type: ignore[assignment]
        cutoff = utcnow() - timedelta(days=1)
        directory = tmp_path / "archive"
        late = asyncio.create_task(second.audit.archive(cutoff, directory))
        await asyncio.wait_for(paused.paused.wait(), 30)
        path = await first.audit.archive(cutoff, directory)
        paused.resume.set()
        with pytest.raises(ArchiveConflictError, match="another process"):
            await late
        assert path is not None
        lines = path.read_text().splitlines()
        assert sum('"type":"event"' in line for line in lines) == 1500
        assert [item.path for item in await first.audit.store.archives()] == [
            str(path.absolute())
        ]
        assert sorted(p.name for p in directory.iterdir()) == [path.name]
        result = await first.audit.verify()
        assert result.ok, result.problem
        assert result.first_seq == 1501
    finally:
        await second.close()
        await first.close()


async def test_concurrent_writers_form_one_chain(settings: Settings) -> None:
    """Two processes' worth of writers appending at once still form one chain."""
    first = await open_services(settings)
    second = await open_services(settings)
    try:

        async def write(services: Services, name: str) -> None:
            for index in range(40):
                await services.audit.store.append(
                    [AuditEvent("blob.pull", actor_account=name, bytes=index)]
                )

        await asyncio.gather(write(first, "one"), write(second, "two"))
        result = await first.audit.verify()
        assert result.ok, result.problem
        assert result.events == 80
    finally:
        await first.close()
        await second.close()


class _HeldStore:
    """The real audit store, whose appends wait until `release` is set."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.release = asyncio.Event()

    async def append(self, events: Sequence[AuditEvent]) -> list[StoredEvent]:
        await self.release.wait()
        return await self.store.append(events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def _settle() -> None:
    """Let every ready task run until it waits on something."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_wait_for_room_while_queue_full(services: Services) -> None:
    """A full queue makes `wait_for_room` wait until the writer takes events."""
    held = _HeldStore(services.audit.store)
    audit = DatabaseAuditLog(
        held,  # type: ignore[arg-type]
        None,
        queue_size=2,
        batch_size=1,
        flush_seconds=0,
    )
    await audit.wait_for_room()  # without the writer, nothing is queued
    audit.start()
    # The writer takes the first event and waits in `append`; two fill the queue.
    for index in range(3):
        await audit.record(AuditEvent("manifest.pull", reference=f"v{index}"))
    await _settle()
    assert audit.queue_depth() == 2

    waiting = asyncio.create_task(audit.wait_for_room())
    await _settle()
    assert not waiting.done()

    held.release.set()
    await asyncio.wait_for(waiting, 30)
    await audit.close()
    assert audit.written == 3
    assert len(await services.audit.query(AuditFilter(), 10)) == 3


async def test_wait_for_room_returns_once_closing(services: Services) -> None:
    """Closing the log releases requests that wait for room."""
    held = _HeldStore(services.audit.store)
    audit = DatabaseAuditLog(
        held,  # type: ignore[arg-type]
        None,
        queue_size=1,
        batch_size=1,
        flush_seconds=0,
    )
    audit.start()
    for index in range(2):
        await audit.record(AuditEvent("manifest.pull", reference=f"v{index}"))
    await _settle()
    waiting = asyncio.create_task(audit.wait_for_room())
    await _settle()
    assert not waiting.done()

    closing = asyncio.create_task(audit.close())
    await _settle()
    assert waiting.done()

    held.release.set()
    await asyncio.wait_for(closing, 30)
    assert audit.written == 2


def test_cli_verify_names_edited_row(settings: Settings) -> None:
    """`moorage audit verify` exits 1 and names the edited event."""

    async def prepare() -> None:
        services = await open_services(settings)
        try:
            await _fill(services, 8)
            await _sql(services, "UPDATE audit_events SET reason = 'x' WHERE seq = 4")
        finally:
            await services.close()

    asyncio.run(prepare())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(
        MOORAGE_DATA_DIR=str(settings.data_dir),
        MOORAGE_DATABASE_URL=settings.resolved_database_url,
    )
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1
    assert "event 4 was altered" in completed.stderr


def _pulls(count: int) -> list[AuditEvent]:
    return [
        AuditEvent("manifest.pull", actor_account="alice", reference=f"v{index}")
        for index in range(count)
    ]


async def test_cancelled_long_change_records_end(services: Services) -> None:
    """A long change whose task is cancelled, as Ctrl-C cancels a command's
    task, records its end with outcome failure, and the cancellation goes on."""
    recorder = AdminRecorder(services.audit, local_actor())
    started = asyncio.Event()

    async def change() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(
        recorder.run_outside_transaction(
            "key.rotate", "key-encryption key", change(), None
        )
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    found = await services.audit.query(AuditFilter(action="key.rotate*"), 10)
    trail = [
        (stored.event.action, stored.event.outcome, stored.event.reason)
        for stored in found
    ]
    assert trail == [
        ("key.rotate.start", "success", "key-encryption key"),
        ("key.rotate", "failure", "key-encryption key: interrupted"),
    ]


async def test_saved_events_added_once(services: Services) -> None:
    """A file saved at shutdown is added once, and a copy of it is not added."""
    audit = services.audit
    saved = audit._save_pending(_pulls(3))
    assert saved is not None
    copy = saved.with_name(saved.name.replace("audit-pending-", "audit-pending-0"))
    copy.write_bytes(saved.read_bytes())

    assert await audit.import_pending() == 3
    assert not saved.exists()
    assert not copy.exists()
    imports = await audit.query(AuditFilter(action=AUDIT_IMPORT), 10)
    assert len(imports) == 1
    assert len(await audit.query(AuditFilter(action="manifest.pull"), 10)) == 3
    assert (await audit.verify()).ok


async def test_changed_saved_file_left_in_place(services: Services) -> None:
    """An edited file fails its HMAC: nothing is added and the file stays."""
    audit = services.audit
    saved = audit._save_pending(_pulls(2))
    assert saved is not None
    saved.write_text(saved.read_text().replace('"alice"', '"mallory"'))

    assert await audit.import_pending() == 0
    assert saved.exists()
    assert await audit.query(AuditFilter(action="manifest.pull"), 10) == []
    result = await audit.verify()
    assert result.ok
    assert any(saved.name in warning for warning in result.warnings)


async def test_saved_file_wrong_types_left_in_place(services: Services) -> None:
    """Values the audit table cannot hold are rejected before any write."""
    audit = services.audit
    saved = audit._save_pending(_pulls(1))
    assert saved is not None
    header, line = saved.read_text().splitlines()
    saved.write_text(header + "\n" + line.replace('"bytes": null', '"bytes": "lots"'))

    assert await audit.import_pending() == 0
    assert saved.exists()


async def test_write_cancelled_after_commit_added_once(services: Services) -> None:
    """A writer cancelled as its batch's commit returns leaves that batch in the
    file saved at shutdown. The next import leaves those events out and adds
    the events that were still queued."""
    audit = services.audit
    audit.shutdown_seconds = 0.5
    audit.start()
    append = audit.store.append
    writer = audit._writer
    assert writer is not None

    async def append_then_cancel(events: Sequence[AuditEvent]) -> list[StoredEvent]:
        stored = await append(events)
        if asyncio.current_task() is writer:
            writer.cancel()
            await asyncio.sleep(0)  # the cancel arrives here, after the commit
        return stored

    audit.store.append = append_then_cancel  # type: ignore[method-assign]
    committed = _pulls(3)
    for event in committed:
        await audit.record(event)
    await asyncio.wait({writer}, timeout=10)
    assert writer.cancelled()
    assert len(await audit.query(AuditFilter(action="manifest.pull"), 10)) == 3
    queued = [
        replace(event, reference=f"q{index}") for index, event in enumerate(_pulls(2))
    ]
    for event in queued:
        await audit.record(event)
    await audit.close()
    audit.store.append = append  # type: ignore[method-assign]
    saved = audit._pending_files()
    assert len(saved) == 1
    assert '"maybe_stored": 3' in saved[0].read_text().splitlines()[0]

    assert await audit.import_pending() == 2
    pulls = await audit.query(AuditFilter(action="manifest.pull"), 10)
    assert sorted(event.event.reference or "" for event in pulls) == [
        "q0",
        "q1",
        "v0",
        "v1",
        "v2",
    ]
    imports = await audit.query(AuditFilter(action=AUDIT_IMPORT), 10)
    assert len(imports) == 1
    assert "left out 3 events" in (imports[0].event.reason or "")
    assert (await audit.verify()).ok


async def test_locked_sqlite_write_added_once(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a write that close() abandons while another connection holds
    the write lock commits once the lock is free, after its events were saved
    to a file. The next import leaves them out."""
    audit = services.audit
    store_writer = audit.store.writer
    if store_writer is None:
        pytest.skip("SQLite only: the write thread outlives a cancelled writer")
    monkeypatch.setattr(audit_log, "_LAST_WRITE_SECONDS", 0.5)
    audit.shutdown_seconds = 0.5
    audit.start()
    locker = sqlite3.connect(store_writer.path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        for event in _pulls(3):
            await audit.record(event)
        for _ in range(200):  # the writer takes the batch within 10 s
            if audit._in_flight:
                break
            await asyncio.sleep(0.05)
        assert len(audit._in_flight) == 3
        await audit.close()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    saved = audit._pending_files()
    assert len(saved) == 1
    assert '"maybe_stored": 3' in saved[0].read_text().splitlines()[0]
    for _ in range(100):  # the write thread commits within 10 s
        pulls = await audit.query(AuditFilter(action="manifest.pull"), 10)
        if pulls:
            break
        await asyncio.sleep(0.1)
    assert len(pulls) == 3

    assert await audit.import_pending() == 0
    assert len(await audit.query(AuditFilter(action="manifest.pull"), 10)) == 3
    assert (await audit.verify()).ok


async def test_saved_file_imported_once_concurrently(settings: Settings) -> None:
    """Two processes that import the same saved file at once add it once: the
    second waits for the first one's commit, then finds its audit.import event."""
    first = await open_services(settings)
    second = await open_services(settings)
    try:
        saved = first.audit._save_pending(_pulls(3))
        assert saved is not None
        counts = await asyncio.gather(
            first.audit.import_pending(), second.audit.import_pending()
        )
        assert sorted(counts) == [0, 3]
        assert not saved.exists()
        imports = await first.audit.query(AuditFilter(action=AUDIT_IMPORT), 10)
        assert len(imports) == 1
        pulls = await first.audit.query(AuditFilter(action="manifest.pull"), 10)
        assert len(pulls) == 3
        assert (await first.audit.verify()).ok
    finally:
        await second.close()
        await first.close()


async def test_saved_file_bad_count_left_in_place(services: Services) -> None:
    """A header whose maybe_stored is not a count of the file's events is
    rejected before any write."""
    audit = services.audit
    saved = audit._save_pending(_pulls(2), 1)
    assert saved is not None
    header, *lines = saved.read_text().splitlines()
    assert '"maybe_stored": 1' in header
    saved.write_text(
        "\n".join([header.replace('"maybe_stored": 1', '"maybe_stored": 3'), *lines])
    )

    assert await audit.import_pending() == 0
    assert saved.exists()
    assert await audit.query(AuditFilter(action="manifest.pull"), 10) == []


async def test_query_source_network(services: Services) -> None:
    """A source network matches the events from addresses inside it, IPv4 and
    IPv6, and never events whose source is not an address."""
    for address in ("10.1.2.3", "10.200.0.9", "192.0.2.7", "2001:db8::5", "local"):
        await services.audit.record_now(
            AuditEvent("auth.login", actor_account="alice", source_address=address)
        )

    async def sources(network: str) -> list[str | None]:
        found = await services.audit.query(AuditFilter(source_network=network), 100)
        return [stored.event.source_address for stored in found]

    assert await sources("10.0.0.0/8") == ["10.1.2.3", "10.200.0.9"]
    assert await sources("10.1.2.3/32") == ["10.1.2.3"]
    assert await sources("2001:db8::/32") == ["2001:db8::5"]
    assert await sources("0.0.0.0/0") == ["10.1.2.3", "10.200.0.9", "192.0.2.7"]
    assert await sources("198.51.100.0/24") == []


async def test_pull_events_skip_observers(services: Services) -> None:
    """`record` calls no observer for pulls; every other event reaches them."""
    observed: list[str] = []
    services.audit.observers.append(lambda event: observed.append(event.action))
    for action in (MANIFEST_PULL, BLOB_PULL, AUTH_LOGIN, BLOB_PUSH):
        await services.audit.record(AuditEvent(action, outcome=FAILURE))
    assert observed == [AUTH_LOGIN, BLOB_PUSH]
    assert len(await services.audit.query(AuditFilter(), 10)) == 4


async def test_unobserved_actions_unwatched(services: Services) -> None:
    """The installed observers act on none of the actions that skip them."""
    skipped = services.audit.unobserved_actions
    assert skipped == {MANIFEST_PULL, BLOB_PULL}
    assert not skipped & alerts._WATCHED_ACTIONS
    before = services.metrics.render()
    for action in skipped:
        for outcome in (SUCCESS, FAILURE):
            services.metrics.observe_event(AuditEvent(action, outcome=outcome))
    assert services.metrics.render() == before
