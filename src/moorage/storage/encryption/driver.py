"""A storage driver that encrypts whatever another driver stores.

Each object gets a random 32-byte data key. With a `DataKeyCustody` attached
(the server and the CLI attach one), the data key is wrapped once per owner
whose repositories reference the object, under that owner's key-encryption key,
and the wraps are kept in the database (see `custody`). Without one, or for an
object created outside any owner's context, the data key is wrapped by the
keyring's active key-encryption key into an envelope stored next to the data
under `.keys/<xx>/<object id>`; installations from before owner keys have only
such envelopes, and reads fall back to them. The object's header carries its
id, so `move` needs to touch only the data: the wraps and the envelope follow by
that id. Rotation rewraps keys and never the data.

With a custody attached, the database also records the path of each object
(`object_paths`), and an object opens only at its recorded path: a whole file
copied over another object's path raises `MisplacedObjectError`, an integrity
error, rather than serving the content of the file copied. `move` carries the
record along.

Objects written before encryption was turned on have no header; they are read
as they are, and `maintenance.encrypt_all` converts them.

Integrity failures raise `IntegrityError` and are reported to
`on_integrity_error` (logged, and handed to the audit trail when one is
attached), so a reader gets an error and never altered bytes. An object whose
data key no key here unwraps because its owners were shredded (the database
records it in `shredded_objects`) raises `DataKeyUnavailableError` and is
logged as a warning instead: its content was destroyed on purpose, not altered.
An object that lost its wraps any other way is damage, an integrity error.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import fcntl
import json
import mmap
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import structlog

from moorage.storage.drivers.base import (
    Claim,
    FileInfo,
    FileWriter,
    PathNotFoundError,
    StorageDriver,
)
from moorage.storage.encryption.format import (
    DATA_KEY_BYTES,
    DEFAULT_SEGMENT_BYTES,
    HEADER_BYTES,
    SEGMENT_OVERHEAD,
    DataKeyUnavailableError,
    Header,
    IntegrityError,
    MisplacedObjectError,
    SegmentCipher,
    parse_header,
    wrap_context,
)
from moorage.storage.encryption.keys import Keyring, UnwrapError

if TYPE_CHECKING:
    from moorage.db.wrap_store import DataKeyWrap
    from moorage.storage.encryption.custody import DataKeyCustody

log = structlog.get_logger(__name__)

ENVELOPES_PREFIX = ".keys"
WORK_PREFIX = ".reencrypt"
_PRIVATE_PREFIXES = (f"{ENVELOPES_PREFIX}/", f"{WORK_PREFIX}/")

IntegrityHook = Callable[[IntegrityError], None]
# Plaintext bytes read and decrypted at a time from a local file, and so the
# size of each chunk the server sends.
READ_RUN_BYTES = 1024 * 1024
# Run size of a `SegmentReader` that starts as the driver's only local read,
# which reads the next run ahead in a second thread. Each run then costs a
# hand-off between the two threads, and larger runs make fewer of them. Of
# the readers open at one time, at most one per driver has these larger runs.
LONE_READ_RUN_BYTES = 4 * READ_RUN_BYTES
# Runs of plaintext (of `READ_RUN_BYTES` each) that concurrent readers of the
# same file share, kept per file and process while more than one reads it
# (see `_SharedRuns`).
SHARED_RUNS = 8
# Seconds since its last run after which a reader no longer counts as one
# that a reader ahead of it waits for (see `_SharedRuns.behind`).
_ACTIVE_SECONDS = 0.05
# Plaintext buffers kept per read for reuse: one the caller holds, one the
# transport may still be sending, one to fill.
_KEPT_BUFFERS = 3
# Reads that fail rather than wait for the disk (Linux); elsewhere every run
# is read in a worker thread.
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
# Read leases (Linux), which let a reader decrypt straight from a memory map of
# the file (see `_FileSegments.map`); elsewhere every run is copied with preadv.
_LEASES = hasattr(fcntl, "F_SETLEASE")
# The shortest /proc/sys/fs/lease-break-time, in seconds, with which files are
# mapped: a run must be decrypted within that time (see `_FileSegments.map`).
_MIN_LEASE_BREAK_SECONDS = 5
# Files smaller than this are read with preadv: for a run or two, taking a
# lease, mapping and unmapping cost about as much as the copy they save.
_MIN_MAPPED_BYTES = 4 * READ_RUN_BYTES
# Threads that read and decrypt the next run for a `SegmentReader`. Apart from
# the threads that wait for them, so that a wait cannot block its own run.
_READ_AHEAD = ThreadPoolExecutor(
    max_workers=os.cpu_count() or 2, thread_name_prefix="moorage-read-ahead"
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A data key wrapped by one key-encryption key."""

    key_id: str
    wrapped: bytes

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"version": 1, "kek": self.key_id, "wrapped": self.wrapped.hex()}
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        value = json.loads(data)
        return cls(value["kek"], bytes.fromhex(value["wrapped"]))


def envelope_path(object_id: bytes) -> str:
    name = object_id.hex()
    return f"{ENVELOPES_PREFIX}/{name[:2]}/{name}"


def log_integrity_error(error: IntegrityError) -> None:
    log.error("storage integrity error", path=error.path, reason=error.reason)


def log_data_key_unavailable(error: DataKeyUnavailableError) -> None:
    log.warning("object data key unavailable", path=error.path, reason=error.reason)


class EncryptedDriver(StorageDriver):
    """Encrypts objects of `inner` with AES-256-GCM in fixed-size segments."""

    def __init__(
        self,
        inner: StorageDriver,
        keyring: Keyring,
        *,
        encrypt_new: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        on_integrity_error: IntegrityHook = log_integrity_error,
    ) -> None:
        self.inner = inner
        self.keyring = keyring
        self.encrypt_new = encrypt_new
        self.segment_bytes = segment_bytes
        self.on_integrity_error = on_integrity_error
        self.custody: DataKeyCustody | None = None
        # Encrypted local files being read through this driver now.
        self._local_reads = 0
        # Decrypted runs shared by the open `SegmentReader`s of each file.
        self._shared_runs: dict[tuple[int, int, bytes], _SharedRuns] = {}

    # Keys

    async def new_cipher(self, path: str) -> SegmentCipher:
        """Create a data key for a new object at `path`, store its wraps or
        envelope, and record its path."""
        header = Header.new(self.segment_bytes)
        data_key = os.urandom(DATA_KEY_BYTES)
        owners: tuple[str, ...] = ()
        if self.custody is not None:
            owners = await self.custody.owners_for_new_object()
        if owners:
            assert self.custody is not None
            await self.custody.wrap(header.object_id, data_key, owners, path)
        else:
            if self.custody is not None:
                await self.custody.record_path(header.object_id, path)
            # NOTE: shredding does not reach installation envelopes. The registry
            # names an owner for every upload and blob it writes, so only objects
            # that no repository uses (re-encrypted orphans) end up here.
            await self._store_envelope(header.object_id, data_key)
        return SegmentCipher(header, data_key)

    async def open_cipher(self, path: str, header: Header) -> SegmentCipher:
        """Unwrap the data key of an existing object."""
        return SegmentCipher(header, await self.data_key(path, header))

    async def data_key(self, path: str, header: Header) -> bytes:
        """Unwrap an object's data key: from an owner's wrap, else its envelope."""
        if self.custody is not None:
            try:
                data_key = await self.custody.unwrap(path, header.object_id)
            except DataKeyUnavailableError as error:
                raise await self._unavailable(path, header, error.reason) from None
            except MisplacedObjectError as error:
                self.on_integrity_error(error)
                raise
            if data_key is not None:
                return data_key
        envelope = await self._load_envelope(path, header)
        kek = self.keyring.get(envelope.key_id)
        try:
            return kek.unwrap(envelope.wrapped, wrap_context(header.object_id))
        except UnwrapError:
            raise self._integrity(path, "its data key does not unwrap") from None

    async def _store_envelope(self, object_id: bytes, data_key: bytes) -> None:
        kek = self.keyring.active()
        envelope = Envelope(kek.key_id, kek.wrap(data_key, wrap_context(object_id)))
        await self.inner.put(envelope_path(object_id), envelope.to_bytes())

    async def _load_envelope(self, path: str, header: Header) -> Envelope:
        try:
            stored = await _read_all(self.inner, envelope_path(header.object_id))
        except PathNotFoundError:
            if self.custody is None:
                raise self._integrity(
                    path, "its data key envelope is missing"
                ) from None
            reason = "no owner key wraps its data key and it has no envelope"
            raise await self._unavailable(path, header, reason) from None
        return Envelope.from_bytes(stored)

    async def _unavailable(
        self, path: str, header: Header, reason: str
    ) -> IntegrityError:
        """Classify an object whose data key no key here opens.

        Shredding records every object whose last wrap it deletes, in the
        transaction that deletes it. Such an object was destroyed on purpose
        (a warning); any other was damaged, by lost wraps or a lost owner key,
        and is reported like altered ciphertext.
        """
        assert self.custody is not None
        if await self.custody.shredded(header.object_id):
            error = DataKeyUnavailableError(
                path, f"{reason}: its owners' keys were shredded"
            )
            log_data_key_unavailable(error)
            return error
        return self._integrity(
            path, f"{reason}, and it was not shredded: its wraps were lost"
        )

    # Owners

    async def share(self, path: str, owner: str, digest: str) -> None:
        """Wrap a blob's data key for `owner` too, when it has no wrap yet.

        A blob that still has only an installation envelope is first given a
        wrap for each owner of `digest`, and its envelope is deleted, so that
        no owner's wrap is left out. The check and the new wraps are one step
        of `WrapStore.add_missing`, which a concurrent release cannot split.
        Raises MisplacedObjectError when the file at `path` is a copy of an
        object recorded elsewhere.
        """
        custody = self.custody
        if custody is None:
            return
        try:
            header = await self.read_header(path)
        except PathNotFoundError:
            return
        if header is None:
            return
        object_id = header.object_id
        try:
            # An owner that has a wrap already gets no new one, so the path is
            # checked here rather than by unwrapping.
            await custody.check_place(path, object_id)
        except MisplacedObjectError as error:
            self.on_integrity_error(error)
            raise
        adopted = False

        async def new_wraps() -> list[DataKeyWrap]:
            nonlocal adopted
            data_key = await self.data_key(path, header)
            if await custody.owners(object_id):
                return await custody.wraps_for(object_id, data_key, [owner])
            adopted = True
            everyone = await custody.wraps.owners_of_digest(digest) | {owner}
            return await custody.wraps_for(object_id, data_key, everyone)

        await custody.wraps.add_missing(object_id.hex(), owner, new_wraps)
        if adopted:
            await self.inner.delete(envelope_path(object_id))

    async def release(self, path: str, owner: str, digest: str) -> None:
        """Delete `owner`'s wrap of a blob that none of its repositories uses now."""
        if self.custody is None:
            return
        try:
            header = await self.read_header(path)
        except PathNotFoundError:
            return
        if header is None:
            return
        try:
            await self.custody.check_place(path, header.object_id)
        except MisplacedObjectError as error:
            # The file is a copy of another object, whose wraps must stay.
            self.on_integrity_error(error)
            return
        await self.custody.wraps.release(header.object_id.hex(), owner, digest)

    async def read_header(self, path: str) -> Header | None:
        """Return the object's header, or None when it is stored in plaintext."""
        return parse_header(await _read_all(self.inner, path, 0, HEADER_BYTES))

    def _integrity(self, path: str, reason: str) -> IntegrityError:
        error = IntegrityError(path, reason)
        self.on_integrity_error(error)
        return error

    # Reading

    async def stat(self, path: str) -> FileInfo:
        info = await self.inner.stat(path)
        header = await self.read_header(path)
        if header is None:
            return info
        size = header.plaintext_size(info.size)
        if size < 0:
            raise self._integrity(path, "the stored object is cut short")
        return FileInfo(path, size, info.modified)

    async def read(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        file = await self.inner.open_file(path)
        if file is not None:
            chunks = self._read_file(path, file, offset, length)
        else:
            chunks = self._read_stream(path, offset, length)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _read_file(
        self, path: str, file: BinaryIO, offset: int, length: int | None
    ) -> AsyncIterator[bytes | memoryview]:
        """Read a local file a run of segments at a time (see `_FileSegments`)."""
        try:
            fd = file.fileno()
            stored_size = os.fstat(fd).st_size
            header = parse_header(os.pread(fd, HEADER_BYTES, 0))
            if header is not None:
                cipher = await self.open_cipher(path, header)
        except BaseException:
            file.close()
            raise
        if header is None:
            file.close()
            async for chunk in self.inner.read(path, offset, length):
                yield chunk
            return
        runs = _FileSegments(path, fd, cipher, stored_size)
        if runs.plaintext_size < 0:
            file.close()
            raise self._integrity(path, "the stored object is cut short")
        end = runs.plaintext_size
        if length is not None:
            end = min(end, offset + length)
        segment = header.segment_bytes
        index = min(offset // segment, runs.segments - 1)
        # At least one segment is opened, so that an empty object is authenticated.
        last = max(index, (end - 1) // segment)
        per_run = max(1, READ_RUN_BYTES // segment)
        skip = offset - index * segment
        self._local_reads += 1
        try:
            while index <= last:
                count = min(per_run, last + 1 - index)
                try:
                    plain = await runs.open(index, count)
                except IntegrityError as error:
                    self.on_integrity_error(error)
                    raise
                start = index * segment
                index += count
                if index <= last and self._local_reads == 1:
                    # A lone read leaves a core idle: the next run is read and
                    # decrypted there while this one is sent. Concurrent reads
                    # keep the cores busy already, and a thread per run would
                    # only add CPU time.
                    runs.read_ahead(index, min(per_run, last + 1 - index))
                view = memoryview(plain)[skip : end - start]
                skip = 0
                if view:
                    yield view
                del view, plain
        finally:
            self._local_reads -= 1
            runs.close(file)
        if length is not None and offset + length > end:
            missing = offset + length - end
            raise self._integrity(path, f"{missing} bytes short of the length read")

    async def open_reader(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> SegmentReader | None:
        """Open an encrypted local file for reading in a worker thread.

        Returns None when the object has no local file or is stored in
        plaintext; `read` serves those.
        """
        file = await self.inner.open_file(path)
        if file is None:
            return None
        try:
            fd = file.fileno()
            stored_size = os.fstat(fd).st_size
            header = parse_header(os.pread(fd, HEADER_BYTES, 0))
            if header is None:
                file.close()
                return None
            cipher = await self.open_cipher(path, header)
            runs = _FileSegments(path, fd, cipher, stored_size)
            if runs.plaintext_size < 0:
                raise self._integrity(path, "the stored object is cut short")
        except BaseException:
            file.close()
            raise
        runs.map()
        status = os.fstat(fd)
        key = (status.st_dev, status.st_ino, header.object_id)
        shared = self._shared_runs.get(key)
        if shared is None:
            shared = self._shared_runs[key] = _SharedRuns(key)
        return SegmentReader(
            self, runs, file, offset, length, header.segment_bytes, shared
        )

    def _leave_shared(self, shared: _SharedRuns) -> None:
        """Forget a reader of `shared`; drop its runs once none is left."""
        shared.readers -= 1
        if shared.readers == 0:
            if self._shared_runs.get(shared.key) is shared:
                del self._shared_runs[shared.key]
            shared.clear()

    async def _read_stream(
        self, path: str, offset: int, length: int | None
    ) -> AsyncIterator[bytes | memoryview]:
        if offset == 0:
            # One stream from the start: the header and the data come from the
            # same open object even if it is replaced meanwhile.
            stream = self.inner.read(path, 0, None)
            first = await _read_prefix(stream, HEADER_BYTES)
            header = parse_header(first)
            if header is None:
                chunks = _limit(_prepend(first, stream), length)
                async for chunk in chunks:
                    yield chunk
                return
            body = _prepend(first[HEADER_BYTES:], stream)
            first_index = 0
        else:
            header = await self.read_header(path)
            if header is None:
                async for chunk in self.inner.read(path, offset, length):
                    yield chunk
                return
            first_index = offset // header.segment_bytes
            body = self.inner.read(path, header.segment_offset(first_index), None)
        cipher = await self.open_cipher(path, header)
        skip = offset - first_index * header.segment_bytes
        async for chunk in self._decrypt(path, cipher, body, first_index, skip, length):
            yield chunk

    async def _decrypt(
        self,
        path: str,
        cipher: SegmentCipher,
        body: AsyncIterator[bytes | memoryview],
        index: int,
        skip: int,
        length: int | None,
    ) -> AsyncIterator[bytes | memoryview]:
        remaining = length
        batches = _open_segments(path, cipher, body, index)
        try:
            async for plain in batches:
                if skip:
                    plain, skip = plain[skip:], max(0, skip - len(plain))
                if remaining is not None:
                    plain = plain[:remaining]
                    remaining -= len(plain)
                if plain:
                    yield plain
                if remaining == 0:
                    return
        except IntegrityError as error:
            self.on_integrity_error(error)
            raise
        finally:
            await batches.aclose()  # type: ignore[attr-defined]
        if remaining:
            raise self._integrity(path, f"{remaining} bytes short of the length read")

    # Writing

    async def writer(self, path: str, offset: int = 0) -> FileWriter:
        if offset == 0:
            if not self.encrypt_new:
                return await self.inner.writer(path, 0)
            cipher = await self.new_cipher(path)
            inner = await self.inner.writer(path, 0)
            await inner.write(cipher.header.to_bytes())
            return _EncryptedWriter(self, path, inner, cipher, 0, b"", None)
        header = await self.read_header(path)
        if header is None:
            return await self.inner.writer(path, offset)
        return await self._resume(path, header, offset)

    async def _resume(self, path: str, header: Header, offset: int) -> FileWriter:
        """Continue an object: open its last segment again and rewrite it."""
        cipher = await self.open_cipher(path, header)
        info = await self.inner.stat(path)
        index = (offset - 1) // header.segment_bytes
        start = header.segment_offset(index)
        sealed = await _read_all(self.inner, path, start, header.sealed_segment_bytes)
        final = start + len(sealed) >= info.size
        try:
            plain = cipher.open(path, index, sealed, final)
        except IntegrityError as error:
            self.on_integrity_error(error)
            raise
        keep = offset - index * header.segment_bytes
        if keep > len(plain):
            raise self._integrity(path, f"contains fewer than {offset} bytes")
        inner = await self.inner.writer(path, start)
        # NOTE: the rewritten segment replaces the old one in place. A process
        # killed before `commit` leaves the upload unreadable, so the client
        # has to start that upload again.
        restore = (start, sealed)
        return _EncryptedWriter(self, path, inner, cipher, index, plain[:keep], restore)

    async def put(self, path: str, data: bytes) -> None:
        if not self.encrypt_new:
            await self.inner.put(path, data)
            return
        cipher = await self.new_cipher(path)
        await self.inner.put(path, seal_whole(cipher, data))

    # Managing

    async def move(self, source: str, destination: str) -> None:
        """Move an object and the record of its path.

        The file moves first. A process that dies before the record moves
        leaves the object recorded at `source`, where its file no longer is.
        The registry moves only finished uploads to blob paths, so the client
        then starts a new upload, and its push replaces the file.
        """
        await self.inner.move(source, destination)
        if self.custody is not None:
            await self.custody.wraps.move_path(source, destination)

    async def delete(self, path: str) -> None:
        # `path` names one object or a prefix: an empty listing means the former.
        objects = await self.inner.list(path) or [path]
        object_ids = []
        for key in objects:
            try:
                header = await self.read_header(key)
            except (PathNotFoundError, IsADirectoryError):
                continue
            if header is not None:
                object_ids.append(header.object_id)
        # NOTE: where no file is left to read, the paths' records stay. They
        # cost a row each and open nothing, because an object opens only where
        # its file is.
        if self.custody is not None and object_ids:
            # A file that is a copy of an object recorded elsewhere goes
            # without that object's wraps and envelope.
            forget = await self.custody.wraps.objects_to_forget(
                objects, [object_id.hex() for object_id in object_ids]
            )
            object_ids = [bytes.fromhex(object_id) for object_id in forget]
        await self.inner.delete(path)
        for object_id in object_ids:
            await self.inner.delete(envelope_path(object_id))
        if self.custody is not None:
            await self.custody.forget(object_ids)

    async def claim(self, path: str, destination: str, placed_before: float) -> Claim:
        """Move the file only. The caller records the object's new path in
        the transaction that the move belongs to (see `moorage.storage.gc`)."""
        return await self.inner.claim(path, destination, placed_before)

    async def check(self) -> None:
        await self.inner.check()

    async def list(self, prefix: str) -> list[str]:
        keys = await self.inner.list(prefix)
        return [key for key in keys if not key.startswith(_PRIVATE_PREFIXES)]


class _EncryptedWriter(FileWriter):
    def __init__(
        self,
        driver: EncryptedDriver,
        path: str,
        inner: FileWriter,
        cipher: SegmentCipher,
        index: int,
        pending: bytes,
        restore: tuple[int, bytes] | None,
    ) -> None:
        self._driver = driver
        self._path = path
        self._inner = inner
        self._cipher = cipher
        self._segment = cipher.header.segment_bytes
        self._index = index
        self._pending = bytearray(pending)
        self._sealed_before = index * self._segment
        self._restore = restore

    @property
    def size(self) -> int:
        return self._sealed_before + len(self._pending)

    async def write(self, data: bytes | memoryview) -> None:
        self._pending += data
        # Keep the last segment back: it is sealed as the final one on commit.
        count = (len(self._pending) - 1) // self._segment
        if count <= 0:
            return
        end = count * self._segment
        view = memoryview(self._pending)
        sealed = b"".join(
            self._cipher.seal(
                self._index + i,
                view[i * self._segment : (i + 1) * self._segment],
                False,
            )
            for i in range(count)
        )
        view.release()
        del self._pending[:end]
        self._index += count
        self._sealed_before += end
        await self._inner.write(sealed)

    async def commit(self, *, sync: bool = True) -> int:
        await self._inner.write(
            self._cipher.seal(self._index, bytes(self._pending), True)
        )
        await self._inner.commit(sync=sync)
        return self.size

    async def cancel(self) -> None:
        await self._inner.cancel()
        if self._restore is not None:
            start, sealed = self._restore
            writer = await self._driver.inner.writer(self._path, start)
            await writer.write(sealed)
            await writer.commit()


def seal_whole(cipher: SegmentCipher, data: bytes) -> bytes:
    """Encrypt a whole object held in memory."""
    size = cipher.header.segment_bytes
    view = memoryview(data)
    count = max(1, -(-len(data) // size))
    parts = [cipher.header.to_bytes()]
    for index in range(count):
        piece = view[index * size : (index + 1) * size]
        parts.append(cipher.seal(index, piece, index == count - 1))
    return b"".join(parts)


async def _open_segments(
    path: str,
    cipher: SegmentCipher,
    body: AsyncIterator[bytes | memoryview],
    index: int,
) -> AsyncIterator[memoryview]:
    """Decrypt a stream of sealed segments into one buffer per chunk read.

    The last complete segment is held back until a byte after it arrives or the
    stream ends, so that only the true last segment is opened as the final one.
    Whole segments are decrypted straight out of the chunks read; only a
    segment split across two chunks is copied.
    """
    size = cipher.header.sealed_segment_bytes
    ready: list[memoryview] = []
    held: memoryview | None = None
    partial = bytearray()
    try:
        async for chunk in body:
            view = memoryview(chunk)
            if not view:
                continue
            if held is not None:
                ready.append(held)
                held = None
            position = 0
            if partial:
                position = min(size - len(partial), len(view))
                partial += view[:position]
                if len(partial) < size:
                    continue
                held = memoryview(bytes(partial))
                partial = bytearray()
            while len(view) - position >= size:
                if held is not None:
                    ready.append(held)
                held = view[position : position + size]
                position += size
            if position < len(view):
                if held is not None:
                    ready.append(held)
                    held = None
                partial += view[position:]
            if ready:
                # Decrypting inline costs less CPU than a worker thread: the
                # thread hand-off outweighs ~0.1 ms of AES-GCM per MiB.
                yield _open_batch(path, cipher, index, ready, final=False)
                index += len(ready)
                ready = []
    finally:
        await body.aclose()  # type: ignore[attr-defined]
    last = memoryview(bytes(partial)) if partial else held
    if last is None:
        if index == 0:
            raise IntegrityError(path, "the object has no segments")
        return
    yield _open_batch(path, cipher, index, [last], final=True)


def _open_batch(
    path: str,
    cipher: SegmentCipher,
    index: int,
    sealed: list[memoryview],
    *,
    final: bool,
) -> memoryview:
    """Decrypt consecutive segments into one new buffer; only the last may be final.

    With one buffer per batch the server sends about 1 MiB at a time. Sending
    each 64 KiB segment on its own cost about 0.3 s more server CPU per GiB
    pulled (one worker, 1 and 8 clients, on a 2-core machine). The buffer is
    never reused, because the server's transport may still hold the last one.
    """
    sizes = [max(0, len(piece) - SEGMENT_OVERHEAD) for piece in sealed]
    buffer = memoryview(bytearray(sum(sizes)))
    last = len(sealed) - 1
    position = 0
    for offset, piece in enumerate(sealed):
        end = position + sizes[offset]
        final_piece = final and offset == last
        cipher.open_into(path, index + offset, piece, final_piece, buffer[position:end])
        position = end
    return buffer


class _FileSegments:
    """Reads and decrypts runs of segments of one encrypted local file.

    A run whose bytes are in the page cache is read and decrypted in the event
    loop thread. A run goes to a worker thread when it has to wait for the
    disk, or when the caller reads it ahead (see `read_ahead`). Handing every
    run to a thread cost about 0.25 s more CPU per GiB pulled, against about
    0.1 s/GiB for AES-GCM itself. That cost is a thread hop per run and the
    GIL passed back and forth around each segment's AES-GCM call.

    Plaintext buffers are reused once nothing else refers to them (see
    `_free_buffer`), which saves zeroing and faulting in 1 MiB per run.

    NOTE: runs read here, and runs of a file that cannot be mapped (see
    `map`), are still copied from the page cache into the sealed buffer. Every
    byte is also copied from the plaintext buffer into the socket, which
    `sendfile` spares plaintext blobs.
    """

    def __init__(
        self, path: str, fd: int, cipher: SegmentCipher, stored_size: int
    ) -> None:
        header = cipher.header
        self.path = self._path = path
        self._fd = fd
        self._cipher = cipher
        self._stored_size = stored_size
        self._sealed = bytearray()
        self._buffers: list[bytearray] = []
        self._pending: asyncio.Future[bytearray | None] | None = None
        # None once the file's filesystem rejects RWF_NOWAIT (tmpfs, NFS).
        self._nowait = _NOWAIT
        # The file's memory map while a read lease guards it (see `map`).
        self._mapped: mmap.mmap | None = None
        # Map offset before which `_drop_pages` removed the pages.
        self._dropped = 0
        self.plaintext_size = header.plaintext_size(stored_size)
        body = stored_size - HEADER_BYTES
        self.segments = max(1, -(-body // header.sealed_segment_bytes))

    async def open(self, first: int, count: int) -> bytearray:
        """Return the plaintext of `count` segments from `first`, all authenticated."""
        if self._pending is None and self._nowait is not None:
            plain = self._open(first, count, self._nowait)
            if plain is not None:
                return plain
        if self._pending is None:
            self.read_ahead(first, count)
        assert self._pending is not None
        try:
            plain = await self._pending
        finally:
            self._pending = None
        assert plain is not None
        return plain

    def read_ahead(self, first: int, count: int) -> None:
        """Start reading and decrypting a run in a worker thread; the next call
        to `open`, which must ask for the same run, returns it."""
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(None, self._open, first, count, 0)

    def _open(self, first: int, count: int, flags: int) -> bytearray | None:
        """Read and decrypt a run. Return None when `flags` contains RWF_NOWAIT
        and some of the run's bytes are not in the page cache."""
        sealed = self._read_sealed(first, count, flags)
        if sealed is None:
            return None
        plain = self._free_buffer(len(sealed) - count * SEGMENT_OVERHEAD)
        self._decrypt(first, count, sealed, memoryview(plain))
        return plain

    def map(self) -> None:
        """Let `open_into` decrypt straight from a memory map of the file.

        AES-GCM then reads the page cache itself, without the copy that
        `preadv` makes (see `benchmarks/encrypted_pull.py floor`). A file cut
        short while mapped would kill the process with SIGBUS when a mapped
        page past its new end is read. So the map is read only under a read
        lease, which `open_into` takes for each run and releases after it.
        The kernel makes another process that opens the file for writing or
        truncates it wait until the run is decrypted, about a millisecond. A
        run that finds the lease unavailable, or the file's size changed,
        closes the map, and that run and the later ones are read with
        `preadv`, which reports a file cut short as an integrity error.

        NOTE: the kernel takes a lease away by force after
        /proc/sys/fs/lease-break-time seconds. A run whose decryption stalls
        for longer than that (a stopped process), after a writer started to
        wait, could still read a truncated page. Files are mapped only with a
        break time of at least `_MIN_LEASE_BREAK_SECONDS` (the kernel's
        default is 45).

        Does nothing for files under `_MIN_MAPPED_BYTES`, and where leases are
        unavailable: off Linux, when leases are disabled, when the process
        does not own the file and lacks CAP_LEASE, or when the file is open
        for writing.
        """
        if (
            not _LEASES
            or self._stored_size < _MIN_MAPPED_BYTES
            or _lease_break_seconds() < _MIN_LEASE_BREAK_SECONDS
        ):
            return
        try:
            # A lease break sends the lease holder SIGIO unless F_SETSIG sets
            # another signal, and SIGIO would end the process. SIGWINCH is
            # ignored unless a handler is installed.
            fcntl.fcntl(self._fd, fcntl.F_SETSIG, signal.SIGWINCH)
        except OSError:
            return
        # Taking the lease once here shows whether this file can have one.
        if not self._take_lease():
            return
        try:
            self._mapped = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            pass
        finally:
            self._release_lease()

    def unmap(self) -> None:
        """Close the memory map, if there is one."""
        mapped, self._mapped = self._mapped, None
        if mapped is None:
            return
        with contextlib.suppress(BufferError):
            # BufferError: a view of the map still exists, for example in the
            # traceback of an integrity error. Nothing reads it, and the map
            # closes when the view goes.
            mapped.close()

    def _take_lease(self) -> bool:
        """Take a read lease on the file; return whether it has its stored size
        under it. Release the lease when not."""
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            # Leases unavailable, or the file is open for writing somewhere.
            return False
        # The lease now keeps the size. A file cut short before it was taken
        # is read with preadv, which reports it.
        if os.fstat(self._fd).st_size != self._stored_size:
            self._release_lease()
            return False
        return True

    def _release_lease(self) -> None:
        # OSError: the kernel took the lease away by force already.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)

    def _mapped_run(self, first: int, count: int) -> memoryview | None:
        """Return a run's sealed bytes from the map under a read lease, which
        the caller releases, or None to read them."""
        if self._mapped is None:
            return None
        if not self._take_lease():
            # Another process writes to or truncated the file.
            self.unmap()
            return None
        header = self._cipher.header
        start = header.segment_offset(first)
        end = min(start + count * header.sealed_segment_bytes, self._stored_size)
        return memoryview(self._mapped)[start:end]

    def open_into(self, first: int, count: int, out: bytearray) -> memoryview:
        """Read and decrypt a run into `out`, blocking; return the plaintext part.

        `out` must have room for `count` whole segments.
        """
        sealed = self._mapped_run(first, count)
        mapped = sealed is not None
        if sealed is None:
            sealed = self._read_sealed(first, count, 0)
        assert sealed is not None
        plain = memoryview(out)[: len(sealed) - count * SEGMENT_OVERHEAD]
        try:
            self._decrypt(first, count, sealed, plain)
        finally:
            # A view of the map would keep `unmap` from closing it.
            sealed.release()
            if mapped:
                self._release_lease()
        if mapped and self._mapped is not None:
            self._drop_pages(self._cipher.header.segment_offset(first + count))
        return plain

    def _drop_pages(self, end: int) -> None:
        """Remove the map's pages before `end` from the process's resident set.

        The pages stay in the page cache. Without this, each page read stays
        in the resident set, and in the proportional set size that `python -m
        bench` reports, until the map is closed: reading all of a 512 MiB
        file through a map added 512 MiB to VmRSS.
        """
        assert self._mapped is not None
        end = min(end, self._stored_size) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self._dropped:
            self._mapped.madvise(mmap.MADV_DONTNEED, self._dropped, end - self._dropped)
            self._dropped = end

    def _read_sealed(self, first: int, count: int, flags: int) -> memoryview | None:
        header = self._cipher.header
        start = header.segment_offset(first)
        size = min(count * header.sealed_segment_bytes, self._stored_size - start)
        if len(self._sealed) < size:
            self._sealed = bytearray(size)
        sealed = memoryview(self._sealed)[:size]
        try:
            read = _pread_into(self._fd, sealed, start, flags)
        except BlockingIOError:
            return None
        except OSError as error:
            if not flags or error.errno != errno.EOPNOTSUPP:
                raise
            # This filesystem cannot tell whether the pages are cached, so
            # every run of this file is read in a worker thread.
            self._nowait = None
            return None
        if read < size:
            # The file shrank after it was opened.
            raise IntegrityError(self._path, "the stored object is cut short")
        return sealed

    def _decrypt(
        self, first: int, count: int, sealed: memoryview, out: memoryview
    ) -> None:
        final = first + count == self.segments
        self._cipher.open_run_into(self._path, first, sealed, final, out)

    def _free_buffer(self, size: int) -> bytearray:
        """Return a buffer of `size` bytes that nothing else refers to.

        A buffer handed out earlier may still be referenced by the caller or
        queued in the server's transport, directly or through a memoryview.
        A buffer whose only reference is `_buffers` is free: no other code can
        read it any more, so it is overwritten. Reference counts are compared
        with those of a buffer known to be free, counted the same way, so the
        test holds whatever the interpreter's own references are.
        """
        free = _unshared_reference_count()
        counts = _reference_counts(self._buffers)
        for buffer, count in zip(self._buffers, counts, strict=True):
            if count == free and len(buffer) == size:
                return buffer
        buffer = bytearray(size)
        if len(self._buffers) < _KEPT_BUFFERS:
            self._buffers.append(buffer)
        return buffer

    def close(self, file: BinaryIO) -> None:
        """Close `file` now, or when a worker thread still reading it finishes."""
        self._buffers.clear()
        pending = self._pending
        if pending is None or pending.done():
            file.close()
            return

        def close(future: asyncio.Future[bytearray | None]) -> None:
            # No reader awaits this run any more, so its error is discarded.
            if not future.cancelled():
                future.exception()
            file.close()

        pending.add_done_callback(close)


class _SharedRuns:
    """Decrypted runs of one encrypted file, shared by its concurrent readers.

    Clients that pull the same blob at the same time (a deployment that starts
    on many hosts) read the same runs at about the same time. While more than
    one `SegmentReader` of a driver reads a file, each run of `READ_RUN_BYTES`
    that lies whole within a reader's range is decrypted and authenticated
    once and kept here. Readers that come to it later send it without
    decrypting it again. The last `SHARED_RUNS` runs are kept, and all go
    when the last reader of the file closes.

    Readers drift apart, and a run is gone before readers far behind come to
    it. So a reader about to decrypt a run that is not kept, while another
    reader of the file behind it read a run lately, first lets the other
    bodies go (see `SegmentReader._read_shared`), once per run. The readers
    behind catch up, and then share the runs.

    NOTE: a reader served from here does not authenticate the run itself: a
    reader of the same open file did, at most `SHARED_RUNS` runs earlier. A
    file altered after that is detected by the next reader that decrypts the
    run, not by the one served from here.
    """

    def __init__(self, key: tuple[int, int, bytes]) -> None:
        self.key = key
        # SegmentReaders open on the file; changed on the event loop only.
        self.readers = 0
        self.lock = threading.Lock()
        self._runs: OrderedDict[int, bytearray] = OrderedDict()
        # Buffers of runs dropped from `_runs`, reused once nothing refers
        # to them any more (see `_FileSegments._free_buffer`).
        self._spare: list[bytearray] = []
        # The next segment of each reader, by id, and when it last moved.
        self._positions: dict[int, tuple[int, float]] = {}

    def behind(self, reader: int, index: int) -> bool:
        """Return whether a reader other than `reader` is behind segment
        `index` and read a run within the last `_ACTIVE_SECONDS`."""
        now = time.monotonic()
        with self.lock:
            return any(
                other != reader and position < index and now - moved < _ACTIVE_SECONDS
                for other, (position, moved) in self._positions.items()
            )

    def move(self, reader: int, index: int) -> None:
        """Record that `reader` goes on at segment `index`."""
        with self.lock:
            self._positions[reader] = (index, time.monotonic())

    def leave(self, reader: int) -> None:
        with self.lock:
            self._positions.pop(reader, None)

    def get(self, first: int) -> bytearray | None:
        """Return the plaintext of the run from segment `first`, if kept."""
        with self.lock:
            plain = self._runs.get(first)
            if plain is not None:
                self._runs.move_to_end(first)
            return plain

    def buffer(self, size: int) -> bytearray:
        """Return a buffer of `size` bytes that nothing else refers to."""
        with self.lock:
            free = _unshared_reference_count()
            counts = _reference_counts(self._spare)
            for position, count in enumerate(counts):
                if count == free and len(self._spare[position]) == size:
                    return self._spare.pop(position)
        return bytearray(size)

    def keep(self, first: int, plain: bytearray) -> bytearray:
        """Keep an authenticated run's plaintext; return the one to send."""
        with self.lock:
            kept = self._runs.get(first)
            if kept is not None:
                # Another reader decrypted the same run meanwhile.
                self._spare_buffer(plain)
                return kept
            self._runs[first] = plain
            while len(self._runs) > SHARED_RUNS:
                _, dropped = self._runs.popitem(last=False)
                self._spare_buffer(dropped)
            return plain

    def release(self, plain: bytearray) -> None:
        """Take back a buffer from `buffer` that contains no authenticated run."""
        with self.lock:
            self._spare_buffer(plain)

    def _spare_buffer(self, plain: bytearray) -> None:
        if len(self._spare) < _KEPT_BUFFERS:
            self._spare.append(plain)

    def clear(self) -> None:
        with self.lock:
            self._runs.clear()
            self._spare.clear()
            self._positions.clear()


# `SegmentReader._first` before `read_first` (None means the end of the range).
_UNREAD = object()


class SegmentReader:
    """Reads an encrypted local file's plaintext a run of segments at a time,
    with blocking calls, for a worker thread (a `moorage.zerocopy.ThreadedBody`).

    Every segment of a run is authenticated before `read_chunk` returns any of
    its bytes, and only the segments that the range touches are read. An
    integrity error is raised to the caller and reported to the driver's
    `on_integrity_error` on the event loop.

    While it is the driver's only read of a local file, the reader reads and
    decrypts the next run in another thread while the caller sends the last
    one: AES-GCM, `preadv` and socket writes release the GIL, so the two
    threads use both cores. Concurrent reads keep the cores busy already.
    Concurrent readers of the same file share decrypted runs instead (see
    `_SharedRuns`).
    """

    def __init__(
        self,
        driver: EncryptedDriver,
        runs: _FileSegments,
        file: BinaryIO,
        offset: int,
        length: int | None,
        segment: int,
        shared: _SharedRuns | None = None,
    ) -> None:
        self._driver = driver
        self._runs = runs
        self._file = file
        self._loop = asyncio.get_running_loop()
        # The context of the request that opened the reader: a thread of
        # `loop.run_in_executor` does not carry it, and the integrity hook
        # reads the request's caller from it.
        self._context = contextvars.copy_context()
        end = runs.plaintext_size
        if length is not None:
            end = min(end, offset + length)
        self._end = end
        self._missing = 0 if length is None else max(0, offset + length - end)
        self._segment = segment
        self._index = min(offset // segment, runs.segments - 1)
        # At least one segment is opened, so that an empty object is authenticated.
        self._last = max(self._index, (end - 1) // segment)
        run_bytes = LONE_READ_RUN_BYTES if driver._local_reads == 0 else READ_RUN_BYTES
        self._per_run = max(1, run_bytes // segment)
        self._skip = offset - self._index * segment
        # One buffer the caller sends from, one the next run is decrypted into.
        self._buffers = [bytearray(self._per_run * segment) for _ in range(2)]
        self._turn = 0
        self._ahead: Future[memoryview | None] | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        # The first run, once `read_first` has read it.
        self._first: memoryview | object | None = _UNREAD
        self._shared = shared
        # The run for which `_read_shared` last let other bodies go first.
        self._yielded = -1
        # Segments per shared run.
        self._shared_run = max(1, READ_RUN_BYTES // segment)
        driver._local_reads += 1
        if shared is not None:
            shared.readers += 1

    async def read_first(self) -> None:
        """Read and authenticate the first run now, in a worker thread, so that
        damage there raises IntegrityError before the response starts."""
        self._first = await asyncio.to_thread(self._read_first)

    def _read_first(self) -> memoryview | None:
        chunk = self.read_chunk()
        if chunk is not None and not chunk:
            # The empty piece only let other bodies go first, once per run.
            chunk = self.read_chunk()
        return chunk

    def read_chunk(self) -> memoryview | None:
        """Return the next run's plaintext within the range, or None at the end.

        Returns an empty piece, at most once per run, when readers of the same
        file behind this one should go first (see `_SharedRuns`). The plaintext
        stays valid until the next call.
        """
        first, self._first = self._first, _UNREAD
        if first is not _UNREAD:
            return first  # type: ignore[return-value]
        with self._lock:
            if self._closed:
                raise ValueError("read from a closed SegmentReader")
            self._busy = True
        try:
            return self._next()
        except IntegrityError as error:
            self._loop.call_soon_threadsafe(
                self._driver.on_integrity_error, error, context=self._context
            )
            raise
        finally:
            with self._lock:
                self._busy = False
                if self._closed:
                    self._close_file()

    def _next(self) -> memoryview | None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            view = ahead.result()
        else:
            view = self._read(self._buffers[self._turn])
        self._turn ^= 1
        if self._index <= self._last and self._driver._local_reads == 1:
            self._ahead = _READ_AHEAD.submit(self._read, self._buffers[self._turn])
        return view

    def _read(self, buffer: bytearray) -> memoryview | None:
        index = self._index
        if index > self._last:
            if self._missing:
                raise IntegrityError(
                    self._runs.path, f"{self._missing} bytes short of the length read"
                )
            return None
        count = min(self._per_run, self._last + 1 - index)
        shared = self._shared
        if shared is not None and shared.readers > 1:
            unit = self._shared_run
            if index % unit:
                # Read up to the start of a shared run.
                count = min(count, unit - index % unit)
            else:
                count = min(unit, self._runs.segments - index)
                if index + count - 1 <= self._last:
                    return self._read_shared(shared, index, count)
                # The run reaches past the range: read only the range.
                count = self._last + 1 - index
        plain = self._runs.open_into(index, count, buffer)
        return self._view(index, count, plain)

    def _read_shared(self, shared: _SharedRuns, index: int, count: int) -> memoryview:
        """Return a run that lies whole in the range, from `shared` or decrypted
        and kept there."""
        size = count * self._segment
        if index + count == self._runs.segments:
            size = self._runs.plaintext_size - index * self._segment
        kept = shared.get(index)
        if kept is None and self._yielded != index and shared.behind(id(self), index):
            # An empty piece ends the body's trip in its thread, so that the
            # bodies queued behind it, readers of this file among them, go
            # first (see `moorage.zerocopy`). The run is read on the next call.
            self._yielded = index
            return memoryview(b"")
        if kept is None:
            buffer = shared.buffer(self._shared_run * self._segment)
            try:
                self._runs.open_into(index, count, buffer)
            except BaseException:
                shared.release(buffer)
                raise
            kept = shared.keep(index, buffer)
        shared.move(id(self), index + count)
        return self._view(index, count, memoryview(kept)[:size])

    def _view(self, index: int, count: int, plain: memoryview) -> memoryview:
        start = index * self._segment
        self._index = index + count
        view = plain[self._skip : self._end - start]
        self._skip = 0
        return view

    def close(self) -> None:
        """Close the file now, or once no thread reads it any more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._driver._local_reads -= 1
            if self._shared is not None:
                self._shared.leave(id(self))
                self._driver._leave_shared(self._shared)
            if not self._busy:
                self._close_file()

    def _close_file(self) -> None:
        ahead = self._ahead
        if ahead is None or ahead.done():
            self._runs.unmap()
            self._file.close()
            return

        def close(future: Future[memoryview | None]) -> None:
            # No caller reads this run any more, so its error is discarded.
            if not future.cancelled():
                future.exception()
            self._runs.unmap()
            self._file.close()

        ahead.add_done_callback(close)


def _reference_counts(buffers: list[bytearray]) -> list[int]:
    return [sys.getrefcount(buffer) for buffer in buffers]


def _unshared_reference_count() -> int:
    """Return the count `_reference_counts` gives a buffer only its list refers to."""
    return _reference_counts([bytearray()])[0]


def _lease_break_seconds() -> int:
    """Return how long the kernel lets a lease holder take to release, or 0."""
    try:
        with open("/proc/sys/fs/lease-break-time") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 0


def _pread_into(fd: int, buffer: memoryview, offset: int, flags: int) -> int:
    """Fill `buffer` from `offset`; return the bytes read, fewer only at the end.

    With RWF_NOWAIT in `flags`, raise BlockingIOError when a part is not cached.
    """
    filled = 0
    while filled < len(buffer):
        count = os.preadv(fd, [buffer[filled:]], offset + filled, flags)
        if count == 0:
            break
        filled += count
    return filled


async def _read_all(
    driver: StorageDriver, path: str, offset: int = 0, length: int | None = None
) -> bytes:
    return b"".join([chunk async for chunk in driver.read(path, offset, length)])


async def _read_prefix(stream: AsyncIterator[bytes | memoryview], size: int) -> bytes:
    """Read at least `size` bytes from the stream, or all of it when shorter."""
    data = b""
    while len(data) < size:
        try:
            data += await anext(stream)
        except StopAsyncIteration:
            break
    return data


async def _prepend(
    first: bytes, rest: AsyncIterator[bytes | memoryview]
) -> AsyncIterator[bytes | memoryview]:
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _limit(
    chunks: AsyncIterator[bytes | memoryview], length: int | None
) -> AsyncIterator[bytes | memoryview]:
    if length is None:
        async for chunk in chunks:
            yield chunk
        return
    remaining = length
    try:
        async for chunk in chunks:
            if remaining <= 0:
                break
            piece = chunk[:remaining]
            remaining -= len(piece)
            yield piece
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
