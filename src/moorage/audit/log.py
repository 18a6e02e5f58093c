"""The audit log: one interface, with a database implementation.

Request events (pulls, pushes, logins) go through `record`, which only puts
them on a bounded in-memory queue. A background writer appends them to the
database in batches, at most one write per `flush_seconds`. When the queue is
full, `record` waits, so requests slow down instead of losing events. A
request records its events after its response was sent, when the client has
moved on to its next request. The request middleware therefore calls
`wait_for_room` before it handles a request. Without that wait, a client that
sends requests faster than the writer stores events leaves one request task
per response in memory, each waiting in `record`, without limit.

On a graceful shutdown `close` writes everything still queued. While the
database fails, it retries for `shutdown_seconds`, then saves the events still
unwritten to a file in `pending_dir`; `import_pending`, run at the next start,
appends them to the chain. A crash (SIGKILL, power loss) loses the events
queued since the last write: at most `flush_seconds` plus the duration of one
write, and never more than the queue holds.

Administrative changes go through `record_with`: the change and its event
commit in one database transaction, so both are stored or neither is.
Observers and sinks see an administrative event only after that commit.
`record_now` writes one event on its own before it returns; the recorder uses
it for the event of a change that failed and was rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError

from moorage.audit import files
from moorage.audit.checkpoints import Checkpoint, CheckpointSigner, CheckpointVerifier
from moorage.audit.events import (
    AUDIT_ARCHIVE,
    AUDIT_IMPORT,
    AUDIT_REJECTED,
    EVENT_FIELDS,
    FAILURE,
    GENESIS_HASH,
    AuditEvent,
    StoredEvent,
    event_dict,
    fit,
    parse_time,
)
from moorage.audit.verify import ChainChecker, Verification, check_stream
from moorage.db.audit_store import ArchiveConflictError, AuditFilter, AuditStore
from moorage.db.dialects import is_data_error
from moorage.db.schema import utcnow
from moorage.fsync import fsync_directory

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Directory under the data directory for events saved at shutdown, and the key
# that marks the header line of such a file.
PENDING_DIRECTORY = "audit-pending"
PENDING_FORMAT = "moorage_audit_pending"
# Name of the server key (in the database) for those files' HMAC.
AUDIT_PENDING_KEY = "audit_pending_hmac"
# How long `close` waits for a write still running after `shutdown_seconds`.
_LAST_WRITE_SECONDS = 5.0


class AuditSink(Protocol):
    """Forwards stored events elsewhere; `publish` must return without waiting."""

    # The sink's kind, such as "syslog", for logs and metric labels.
    name: str
    # Events dropped because the sink's queue was full, since the process started.
    dropped: int

    def publish(self, events: Sequence[StoredEvent]) -> None: ...

    async def close(self) -> None: ...


EventObserver = Callable[[AuditEvent], None]


class _EventQueue:
    """A bounded FIFO of events with one consumer, which takes them in batches.

    It has the part of asyncio.Queue's interface that the writer needs, but
    `take` removes a whole batch and `task_done` counts a whole batch in one
    call. asyncio.Queue does both one event at a time, and under callgrind its
    put, get and task_done cost about 7,000 instructions per event (CPython
    3.11), about a twentieth of an event's cost.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[AuditEvent] = deque()
        self._unfinished = 0
        # Set when an event arrives in an empty queue; the consumer clears it
        # before it waits on an empty queue.
        self._ready = asyncio.Event()
        # Set when `take` makes room; `put` waits for it.
        self._taken = asyncio.Event()
        self._finished = asyncio.Event()
        self._finished.set()

    def qsize(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def put_nowait(self, event: AuditEvent) -> None:
        items = self._items
        if len(items) >= self.maxsize:
            raise asyncio.QueueFull
        items.append(event)
        if not self._unfinished:
            self._finished.clear()
        self._unfinished += 1
        if len(items) == 1:
            self._ready.set()

    async def put(self, event: AuditEvent) -> None:
        while self.full():
            self._taken.clear()
            await self._taken.wait()
        self.put_nowait(event)

    async def get_batch(self, limit: int) -> list[AuditEvent]:
        """Wait for an event, then take up to `limit` events."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self.take(limit)

    def take(self, limit: int) -> list[AuditEvent]:
        """Take up to `limit` events without waiting."""
        items = self._items
        if limit >= len(items):
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(limit)]
        if batch:
            self._taken.set()
        return batch

    def task_done(self, count: int = 1) -> None:
        """Mark `count` taken events as handled (stored, or given up on)."""
        if count > self._unfinished:
            raise ValueError("task_done() called more times than events were put")
        self._unfinished -= count
        if not self._unfinished:
            self._finished.set()

    async def join(self) -> None:
        """Wait until every event put has been marked done."""
        if self._unfinished:
            await self._finished.wait()


class AuditLog(Protocol):
    async def record(self, event: AuditEvent) -> None:
        """Queue an event; it is written in the next batch."""

    async def record_now(self, event: AuditEvent) -> StoredEvent:
        """Write an event before returning."""

    async def record_with(
        self, change: Awaitable[T], event: Callable[[T], AuditEvent]
    ) -> T:
        """Await a change and write its event, made from its result, with it."""

    async def wait_for_room(self) -> None:
        """Wait while the queue is full (see the module docstring)."""

    async def query(
        self, where: AuditFilter, limit: int, *, newest_first: bool = False
    ) -> list[StoredEvent]: ...

    async def verify(self) -> Verification: ...

    async def export_jsonl(self, out: TextIO, where: AuditFilter) -> int: ...

    async def export_csv(self, out: TextIO, where: AuditFilter) -> int: ...


class DatabaseAuditLog:
    """The audit log kept in the metadata database (see the module docstring)."""

    def __init__(
        self,
        store: AuditStore,
        signer: CheckpointSigner | None,
        *,
        queue_size: int = 10_000,
        batch_size: int | None = None,
        flush_seconds: float = 0.5,
        checkpoint_events: int = 10_000,
        checkpoint_seconds: float = 300,
        shutdown_seconds: float = 30,
        pending_dir: Path | None = None,
        pending_key: bytes | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        # By default a write takes everything queued, because each write costs
        # several database round trips whatever its size. With batches of
        # 1,000, a busy worker's writer fell behind at about 2,000 pulls a
        # second, and requests then waited for room in the full queue.
        self.batch_size = batch_size or queue_size
        self.flush_seconds = flush_seconds
        self.checkpoint_events = checkpoint_events
        self.checkpoint_seconds = checkpoint_seconds
        self.shutdown_seconds = shutdown_seconds
        self.pending_dir = pending_dir
        # Authenticates the files of events saved at shutdown (see _save_pending).
        self.pending_key = pending_key
        self.sinks: list[AuditSink] = []
        self.observers: list[EventObserver] = []
        # Actions that no observer acts on, so `record` does not call them for
        # these: the request events of pulls, which are most events.
        self.unobserved_actions: frozenset[str] = frozenset()
        # Public keys of every active token signing key, for verification.
        self.public_keys: dict[str, Any] | None = None
        # Posts alerts (see moorage.audit.alerts); closed with the log.
        self.alert_webhook: Any | None = None
        self._queue = _EventQueue(queue_size)
        # Set when the writer takes events off a full queue.
        self._room = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # The batch the writer is writing, kept for `close` if it gives up.
        self._in_flight: list[AuditEvent] = []
        # Set by `close` when retrying takes longer than `shutdown_seconds`.
        self._give_up = asyncio.Event()
        self._closing = False
        self._checkpoint_at = time.monotonic()
        self._checkpoint_seq = 0
        self.written = 0

    # Recording

    def start(self) -> None:
        """Start the background writer; without it `record` writes at once."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")

    async def record(self, event: AuditEvent) -> None:
        if event.action not in self.unobserved_actions:
            self._observe(event)
        if self._writer is None or self._closing:
            await self._write([event])
            return
        try:
            # Without a second coroutine when there is room, as there nearly
            # always is (see `wait_for_room`): this runs for every request.
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            await self._queue.put(event)

    async def record_now(self, event: AuditEvent) -> StoredEvent:
        stored = await self.store.append([event])
        self._observe(event)
        await self._publish(stored)
        return stored[0]

    async def record_with(
        self, change: Awaitable[T], event: Callable[[T], AuditEvent]
    ) -> T:
        """Await `change` and append `event(result)` in one transaction; publish it.

        Every store call in `change` joins the transaction (see
        `moorage.db.transactions`), so the change and its event commit together.
        When `change` raises or the event cannot be written, everything rolls
        back and no observer or sink sees the event. `change` must make its store
        calls from this task, and should finish slow work that needs no database
        (password hashing, key generation) before its first write, because on
        SQLite the first write takes the database's write lock until the commit.
        """
        async with self.store.unit_of_work():
            result = await change
            stored = await self.store.append([event(result)])
        self._observe(stored[0].event)
        await self._publish(stored)
        return result

    async def wait_for_room(self) -> None:
        while self._writer is not None and not self._closing and self._queue.full():
            self._room.clear()
            await self._room.wait()

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _observe(self, event: AuditEvent) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                log.exception("audit observer failed", action=event.action)

    async def _write_loop(self) -> None:
        while True:
            batch = await self._queue.get_batch(self.batch_size)
            started = time.monotonic()
            taken = len(batch)
            self._room.set()
            self._in_flight = batch
            stored = await self._append_with_retry(batch)
            if stored is None:
                return  # `close` gave up and saves the events left in the batch.
            self._in_flight = []
            await self._publish_logged(stored)
            self._queue.task_done(taken)
            if self._queue.qsize() < self.batch_size:
                # Wait out the interval unless a full batch is already waiting,
                # so a busy registry is never capped at one batch per interval.
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self.flush_seconds - elapsed))

    def _drain(self, limit: int) -> list[AuditEvent]:
        return self._queue.take(limit)

    async def _append_with_retry(
        self, batch: list[AuditEvent]
    ) -> list[StoredEvent] | None:
        """Append a batch, retrying with backoff; None when `close` gave up.

        Events leave `batch` as they are stored (see `_append_batch`), so a
        `close` that gives up saves only the events still unwritten.
        """
        stored: list[StoredEvent] = []
        delay = 0.5
        while True:
            try:
                await self._append_batch(batch, stored)
                return stored
            except Exception as error:  # noqa: BLE001 (any database error; logged)
                # The batch stays in memory and the queue fills up, so requests
                # wait rather than lose their events while the database is away.
                log.error(
                    "audit write failed; retrying",
                    events=len(batch),
                    error=_describe_error(error),
                    retry_in_seconds=delay,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._give_up.wait(), delay)
            if self._give_up.is_set():
                if stored:
                    await self._publish_logged(stored)
                return None
            delay = min(delay * 2, 30)

    async def _append_batch(
        self, batch: list[AuditEvent], stored: list[StoredEvent]
    ) -> None:
        """Append `batch` in one transaction, or one event at a time when the
        database rejects it for its values.

        Stored events are added to `stored` and removed from `batch`. An error
        other than a data error (a lost connection, a lock) propagates, and
        `batch` then holds the events still unwritten.
        """
        try:
            stored += await self.store.append(batch)
        except Exception as error:
            if not is_data_error(error):
                raise
            log.error(
                "audit write rejected for its values; writing the batch one "
                "event at a time",
                events=len(batch),
                error=_describe_error(error),
            )
            await self._append_each(batch, stored)
            return
        batch.clear()

    async def _append_each(
        self, batch: list[AuditEvent], stored: list[StoredEvent]
    ) -> None:
        """Append events one at a time, each in its own transaction.

        An event that the database still rejects for its values is replaced by
        an `audit.rejected` event, so it cannot hold up the events behind it.
        """
        done = 0
        try:
            for event in batch:
                try:
                    stored += await self.store.append([event])
                except Exception as error:
                    if not is_data_error(error):
                        raise
                    stored += await self._append_rejected(event, error)
                done += 1
        finally:
            del batch[:done]

    async def _append_rejected(
        self, event: AuditEvent, error: Exception
    ) -> list[StoredEvent]:
        """Append an `audit.rejected` event in place of an event the database
        rejected; return nothing when the database rejects that one too."""
        message = _describe_error(error)
        log.error(
            "audit event rejected by the database; storing an audit.rejected "
            "event in its place",
            action=event.action,
            outcome=event.outcome,
            request_id=event.request_id,
            error=message,
        )
        replacement = AuditEvent(
            AUDIT_REJECTED,
            outcome=FAILURE,
            time=event.time,
            actor_account=event.actor_account,
            actor_customer=event.actor_customer,
            source_address=event.source_address,
            request_id=event.request_id,
            reason=f"the database rejected a {event.action} event (outcome "
            f"{event.outcome}): {message}",
        )
        try:
            return await self.store.append([replacement])
        except Exception as second:
            if not is_data_error(second):
                raise
            log.error(
                "audit event lost: the database rejected its audit.rejected "
                "event as well",
                action=event.action,
                request_id=event.request_id,
                error=_describe_error(second),
            )
            return []

    async def _publish_logged(self, stored: list[StoredEvent]) -> None:
        """Publish appended events. A failure is logged and not retried, because
        a retry would append the events a second time."""
        try:
            await self._publish(stored)
        except Exception as error:  # noqa: BLE001 (a failed checkpoint; logged)
            log.error("audit checkpoint failed", error=str(error))

    async def _write(self, events: list[AuditEvent]) -> list[StoredEvent]:
        stored = await self.store.append(events)
        await self._publish(stored)
        return stored

    async def _publish(self, stored: list[StoredEvent]) -> None:
        """Count committed events, pass them to the sinks, and sign when due."""
        self.written += len(stored)
        for sink in self.sinks:
            sink.publish(stored)
        await self._maybe_checkpoint(stored[-1])

    async def _maybe_checkpoint(self, last: StoredEvent) -> None:
        if self.signer is None:
            return
        due_by_time = time.monotonic() - self._checkpoint_at >= self.checkpoint_seconds
        due_by_count = last.seq - self._checkpoint_seq >= self.checkpoint_events
        if due_by_time or due_by_count:
            await self.checkpoint()

    async def checkpoint(self) -> int | None:
        """Sign the newest event's hash now; return its seq (None when empty)."""
        if self.signer is None:
            return None
        seq, head_hash = await self.store.head()
        if seq == 0:
            return None
        await self.store.add_checkpoint(self.signer.sign(seq, head_hash, utcnow()))
        self._checkpoint_at = time.monotonic()
        self._checkpoint_seq = seq
        return seq

    async def close(self) -> None:
        """Write every queued event, sign a last checkpoint, then stop the sinks.

        While writes fail, retry for `shutdown_seconds`, then save the events
        still unwritten to a file in `pending_dir` (see `import_pending`).
        Calling it again does nothing.
        """
        if self._closing:
            return
        self._closing = True
        self._room.set()
        if self._writer is not None:
            await self._stop_writer()
        # The writer stopped while it wrote these, so they may be stored.
        maybe_stored = len(self._in_flight)
        pending = [*self._in_flight, *self._drain(self._queue.qsize())]
        self._in_flight = []
        if pending and self._give_up.is_set():
            self._save_pending(pending, maybe_stored)
        elif pending:
            stored: list[StoredEvent] = []
            try:
                await self._append_batch(pending, stored)
            except Exception as error:  # noqa: BLE001 (any database error; logged)
                log.error(
                    "audit write failed at shutdown", error=_describe_error(error)
                )
                # A write that fails at its commit may have committed.
                self._save_pending(pending, len(pending))
            if stored:
                await self._publish_logged(stored)
        if self.written and not self._give_up.is_set():
            try:
                await self.checkpoint()
            except Exception as error:  # noqa: BLE001 (any database error; logged)
                log.error("audit checkpoint failed at shutdown", error=str(error))
        for sink in self.sinks:
            await sink.close()
        if self.alert_webhook is not None:
            await self.alert_webhook.close()

    async def _stop_writer(self) -> None:
        """Let the writer empty the queue, for at most `shutdown_seconds`."""
        assert self._writer is not None
        try:
            await asyncio.wait_for(self._queue.join(), self.shutdown_seconds)
        except TimeoutError:
            log.error(
                "audit writes still failing at shutdown; saving the queued "
                "events to a file",
                queued=self._queue.qsize() + len(self._in_flight),
                waited_seconds=self.shutdown_seconds,
            )
            self._give_up.set()
            # The writer stops after its current attempt. One that hangs (a
            # database that does not respond) is cancelled. Its batch may
            # commit all the same (on SQLite the write thread goes on), so
            # the import skips the events of that batch found stored.
            await asyncio.wait({self._writer}, timeout=_LAST_WRITE_SECONDS)
        self._writer.cancel()
        # A write blocked inside the database driver (a locked SQLite file waits
        # out its busy timeout) does not end at once on cancel: stop waiting.
        await asyncio.wait({self._writer}, timeout=1)
        self._writer = None

    def _save_pending(
        self, events: list[AuditEvent], maybe_stored: int = 0
    ) -> Path | None:
        """Write events to a new file in `pending_dir` and sync it to disk.

        The first line names the file's id and carries an HMAC of the id and
        the event lines under `pending_key`, so `import_pending` rejects a file
        that was edited, and adds a copy of one at most once. It also names how
        many of the first events were being written when the write stopped
        (`maybe_stored`), so that the import skips those of them that are stored.
        The HMAC does not cover that count: a changed count can only make the
        import skip an event that is stored already, or add one twice.
        """
        try:
            return self._write_pending_file(events, maybe_stored)
        except OSError as error:
            log.error(
                "audit events lost: saving them to a file failed",
                events=len(events),
                directory=str(self.pending_dir),
                error=str(error),
            )
            return None

    def _write_pending_file(
        self, events: list[AuditEvent], maybe_stored: int
    ) -> Path | None:
        if self.pending_dir is None:
            log.error(
                "audit events lost: no directory to save them", events=len(events)
            )
            return None
        self.pending_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        file_id = uuid.uuid4().hex
        # fit() first: a lone surrogate cannot be written as UTF-8.
        lines = [
            json.dumps(event_dict(fit(event)), ensure_ascii=False) for event in events
        ]
        header = {
            PENDING_FORMAT: 1,
            "id": file_id,
            "events": len(lines),
            "maybe_stored": maybe_stored,
            "mac": self._pending_mac(file_id, lines),
        }
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = self.pending_dir / f"audit-pending-{stamp}-{os.getpid()}.jsonl"
        temporary = path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as out:
            out.write(json.dumps(header) + "\n")
            for line in lines:
                out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        fsync_directory(self.pending_dir)
        log.error(
            "audit events saved to a file; the next start adds them to the log",
            events=len(events),
            path=str(path),
        )
        return path

    def _pending_mac(self, file_id: str, lines: list[str]) -> str | None:
        if self.pending_key is None:
            return None
        message = "\n".join([file_id, *lines]).encode()
        return hmac.new(self.pending_key, message, hashlib.sha256).hexdigest()

    def _pending_files(self) -> list[Path]:
        if self.pending_dir is None or not self.pending_dir.is_dir():
            return []
        return sorted(self.pending_dir.glob("audit-pending-*.jsonl"))

    async def import_pending(self) -> int:
        """Append the events that a stopping server saved to files; return how many.

        Each file is appended in one transaction together with an `audit.import`
        event whose reference is the file's id, then removed. A file whose id was
        imported already (the process stopped before removing it, or the file is
        a copy) is only removed. A file that is unreadable, fails its HMAC or
        cannot be appended is logged and left in place, and the server starts.
        """
        imported = 0
        for path in self._pending_files():
            try:
                saved = _read_pending(path)
            except (OSError, ValueError) as error:
                _log_rejected(path, f"unreadable: {error}")
                continue
            if not _mac_matches(self._pending_mac(saved.id, saved.lines), saved.mac):
                _log_rejected(path, "its HMAC does not match, so it was changed")
                continue
            try:
                imported += await self._import_file(path, saved)
            except Exception as error:  # noqa: BLE001 (any database error; logged)
                _log_rejected(path, f"adding its events failed: {error}")
        return imported

    async def _import_file(self, path: Path, saved: _SavedEvents) -> int:
        """Append a saved file's events in one transaction; return how many.

        The transaction locks the chain head before it checks for the file's
        `audit.import` event, so a second process importing the same file waits
        for the first one's commit and then finds its marker.
        """
        async with self.store.unit_of_work():
            await self.store.lock_head()
            if await self.store.has_event(AUDIT_IMPORT, saved.id):
                stored = None
            else:
                stored = await self._append_saved(path, saved)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        if stored is None:
            return 0
        await self._publish_logged(stored)
        log.info("saved audit events added", path=str(path), events=len(stored) - 1)
        return len(stored) - 1

    async def _append_saved(self, path: Path, saved: _SavedEvents) -> list[StoredEvent]:
        """Append a saved file's events and its `audit.import` event, leaving
        out the events that were being written at shutdown and are stored."""
        events = saved.events
        skipped = 0
        if saved.maybe_stored:
            uncertain = events[: saved.maybe_stored]
            found = await self.store.stored_already(uncertain)
            pairs = zip(uncertain, found, strict=True)
            unstored = [event for event, stored in pairs if not stored]
            skipped = len(uncertain) - len(unstored)
            events = [*unstored, *events[saved.maybe_stored :]]
        reason = f"added {len(events)} events saved at shutdown to {path.name}"
        if skipped:
            reason += f"; left out {skipped} events found stored already"
            log.warning(
                "saved audit events found stored already; not added again",
                path=str(path),
                events=skipped,
            )
        marker = AuditEvent(AUDIT_IMPORT, reference=saved.id, reason=reason)
        # NOTE: unlike the writer, an import does not replace an event that the
        # database rejects: the file stays in place until it is fixed by hand,
        # because its events and marker must commit in one transaction.
        return await self.store.append([*events, marker])

    # Reading

    async def query(
        self, where: AuditFilter, limit: int, *, newest_first: bool = False
    ) -> list[StoredEvent]:
        return await self.store.list_events(where, limit, newest_first=newest_first)

    def keys(self) -> dict[str, Any]:
        """Return the JWKS that checks checkpoints: every active signing key."""
        if self.public_keys is not None:
            return self.public_keys
        return self.signer.jwks() if self.signer is not None else {"keys": []}

    async def verify(self) -> Verification:
        """Check archives, then every stored event, the head and the checkpoints."""
        anchor, problem = await self._verify_archives()
        if problem is not None:
            return problem
        checkpoints = await self.store.checkpoints()
        checker = ChainChecker(*anchor, keep={c.seq for c in checkpoints})
        await check_stream(checker, self.store.iterate())
        result = checker.finish(await self.store.head())
        checker.check_checkpoints(checkpoints, CheckpointVerifier(self.keys()))
        saved = self._pending_files()
        if saved:
            names = ", ".join(path.name for path in saved)
            result.warnings.append(
                f"{len(saved)} file(s) of events saved at shutdown are not in the "
                f"log yet ({names} in {self.pending_dir}); the next server start "
                "adds them, or logs at ERROR why it cannot"
            )
        return result

    async def _verify_archives(self) -> tuple[tuple[int, str], Verification | None]:
        """Check that archive files chain into each other and into the table."""
        seq, expected_hash = 0, GENESIS_HASH
        for archive in await self.store.archives():
            problem = await asyncio.to_thread(
                _check_archive, Path(archive.path), expected_hash, archive.last_hash
            )
            if problem is not None:
                failed = Verification(bad_seq=seq + 1)
                failed.problem = problem
                return (seq, expected_hash), failed
            seq, expected_hash = archive.last_seq, archive.last_hash
        return (seq, expected_hash), None

    async def export_jsonl(self, out: TextIO, where: AuditFilter) -> int:
        """Write matching events and the checkpoints among them, ending signed."""
        await self.checkpoint()
        # NOTE: the events are held in memory because the header names the range.
        events = [stored async for stored in self.store.iterate(where)]
        first = events[0].seq if events else None
        last = events[-1].seq if events else None
        files.write_header(out, first, last, self.keys())
        for stored in events:
            files.write_event(out, stored)
        if first is not None and last is not None:
            for checkpoint in await self._range_checkpoints(first, last, events[-1]):
                files.write_checkpoint(out, checkpoint)
        return len(events)

    async def _range_checkpoints(
        self, first: int, last: int, newest: StoredEvent
    ) -> list[Checkpoint]:
        """Return the checkpoints within a range, ending with one for its last event."""
        checkpoints = await self.store.checkpoints(first, last)
        if self.signer is not None and (not checkpoints or checkpoints[-1].seq != last):
            checkpoints.append(self.signer.sign(last, newest.hash, utcnow()))
        return checkpoints

    async def export_csv(self, out: TextIO, where: AuditFilter) -> int:
        writer = files.csv_writer(out)
        count = 0
        async for stored in self.store.iterate(where):
            files.write_csv_row(writer, stored)
            count += 1
        return count

    # Retention

    async def archive(self, before: datetime, directory: Path) -> Path | None:
        """Move events older than `before` to a file, then delete them.

        The file is written and synced to disk before any row is deleted, and
        its last hash is recorded, so `verify` still checks the whole chain.
        Every server worker runs this, so several runs may start at once. A run
        that reads a range while another run deletes it, or that finds the
        range gone when it deletes, raises ArchiveConflictError and leaves the
        other run's file and rows as they are.
        """
        last_seq = await self.store.oldest_before(before)
        if last_seq is None:
            return None
        # NOTE: the archived range is held in memory while the file is written.
        events: list[StoredEvent] = []
        async for stored in self.store.iterate():
            if stored.seq > last_seq:
                break
            events.append(stored)
        if not events:
            return None
        first_seq = events[0].seq
        # The store reads in pages, so a run that reads while another deletes
        # gets part of the range; never write that over the other's file.
        if events[-1].seq != last_seq or len(events) != last_seq - first_seq + 1:
            raise ArchiveConflictError(
                f"events {first_seq}-{last_seq} were archived by another process "
                "while this one read them"
            )
        checkpoints = await self._range_checkpoints(first_seq, last_seq, events[-1])
        path = directory / f"audit-{first_seq:012d}-{last_seq:012d}.jsonl"
        await asyncio.to_thread(_write_archive, path, events, checkpoints, self.keys())
        try:
            await self.record_with(
                self.store.remove_archived(
                    first_seq, last_seq, events[-1].hash, str(path.absolute())
                ),
                lambda removed: AuditEvent(
                    AUDIT_ARCHIVE,
                    reason=f"archived {removed} events ({first_seq}-{last_seq}) "
                    f"to {path.name}",
                ),
            )
        except ArchiveConflictError:
            # The file contains the same events as the other run's file of this
            # name, if it has one; a file of another range is not recorded.
            recorded = {Path(item.path) for item in await self.store.archives()}
            if path.absolute() not in recorded:
                path.unlink(missing_ok=True)
            raise
        return path


@dataclass(frozen=True)
class _SavedEvents:
    """A file of events saved at shutdown, as read (see `_save_pending`)."""

    id: str
    mac: str | None
    lines: list[str]
    events: list[AuditEvent]
    # How many of the first events may be stored already (see `_save_pending`).
    maybe_stored: int = 0


def _read_pending(path: Path) -> _SavedEvents:
    """Read a saved file; raise ValueError when it is malformed."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not lines:
        raise ValueError("the file is empty")
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get(PENDING_FORMAT) != 1:
        raise ValueError("the first line is not a saved-events header")
    file_id, mac = header.get("id"), header.get("mac")
    if not isinstance(file_id, str) or not file_id:
        raise ValueError("the header has no id")
    if mac is not None and not isinstance(mac, str):
        raise ValueError("the header's mac is not text")
    if header.get("events") != len(lines) - 1:
        raise ValueError(
            f"the header names {header.get('events')} events, the file has "
            f"{len(lines) - 1}"
        )
    # Files from before the count have none.
    maybe_stored = header.get("maybe_stored", 0)
    if type(maybe_stored) is not int or not 0 <= maybe_stored <= len(lines) - 1:
        raise ValueError(f"the header's maybe_stored is not a count: {maybe_stored!r}")
    events = [_pending_event(json.loads(line)) for line in lines[1:]]
    return _SavedEvents(file_id, mac, lines[1:], events, maybe_stored)


def _pending_event(data: Any) -> AuditEvent:
    if not isinstance(data, dict):
        raise ValueError("an event line is not a JSON object")
    values: dict[str, Any] = {}
    for name in EVENT_FIELDS:
        value = data.get(name)
        if name == "time":
            values[name] = parse_time(str(value))
        elif name == "bytes":
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"bytes is not a count: {value!r}")
            values[name] = value
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"{name} is not text: {value!r}")
        else:
            values[name] = value
    if not values["action"] or not values["outcome"]:
        raise ValueError("an event has no action or outcome")
    return fit(AuditEvent(**values))


def _describe_error(error: Exception) -> str:
    """Return an error's message without the SQL statement SQLAlchemy adds."""
    if isinstance(error, DBAPIError):
        sqlstate = getattr(error.orig, "sqlstate", None)
        return f"{error.orig} (SQLSTATE {sqlstate})" if sqlstate else str(error.orig)
    return f"{type(error).__name__}: {error}"


def _mac_matches(expected: str | None, found: str | None) -> bool:
    if expected is None or found is None:
        return expected is None and found is None
    return hmac.compare_digest(expected, found)


def _log_rejected(path: Path, reason: str) -> None:
    log.error(
        "saved audit events not added; the file is left in place",
        path=str(path),
        reason=reason,
    )


def _check_archive(path: Path, expected_prev: str, recorded_last: str) -> str | None:
    """Return what is wrong with one archive file, or None when it checks out."""
    if not path.is_file():
        return f"archive {path} is missing"
    export = files.read_export(path)
    result = files.verify_export(export)
    if not result.ok:
        return f"archive {path}: {result.problem}"
    if not export.events or export.events[0].prev_hash != expected_prev:
        return f"archive {path} does not continue the previous archive"
    if files.last_hash(export.events) != recorded_last:
        return f"archive {path} differs from the hash recorded when it was written"
    return None


def _write_archive(
    path: Path,
    events: list[StoredEvent],
    checkpoints: list[Checkpoint],
    keys: dict[str, Any],
) -> None:
    """Write an archive file and sync it to disk before any row is deleted.

    The events go to a temporary file that is renamed to `path` once complete,
    so a failed write leaves no partial archive.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: another process may write an archive of this range
    # at the same time, and must neither truncate nor delete this file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        # Readable by the server's user only, like the database it comes from.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as out:
            files.write_header(out, events[0].seq, events[-1].seq, keys)
            for stored in events:
                files.write_event(out, stored)
            for checkpoint in checkpoints:
                files.write_checkpoint(out, checkpoint)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except OSError as error:
        # Name the archive, not its temporary file or a parent directory.
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)
