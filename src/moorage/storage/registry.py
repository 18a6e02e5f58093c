"""Registry logic: blobs, upload sessions, manifests, tags and referrers.

This layer owns digests, sessions and visibility rules; it stores bytes through
a `StorageDriver` and metadata through a `RegistryStore`, and raises domain
errors from `moorage.errors`. It knows nothing of HTTP.

Upload sessions live in the database and the driver, so they survive a restart
and may continue on another process. The running digest of a session is kept in
memory as an optimisation; when it is missing (after a restart, or on another
replica) the data received so far is hashed again when the upload finishes.
"""

from __future__ import annotations

import asyncio
import mmap
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, ClassVar

import structlog

from moorage.db.registry_store import (
    ManifestRecord,
    ReferrerRecord,
    RegistryStore,
    UploadRecord,
)
from moorage.digests import Digest, is_digest, new_hasher, parse_digest
from moorage.errors import (
    BlobUnknownError,
    DigestInvalidError,
    ManifestUnknownError,
    NameUnknownError,
    RangeInvalidError,
    SizeInvalidError,
    UploadInvalidError,
    UploadUnknownError,
)
from moorage.names import validate_tag
from moorage.storage import paths
from moorage.storage.drivers.base import (
    FileWriter,
    PathNotFoundError,
    StorageDriver,
)
from moorage.storage.encryption.custody import DataKeyUnavailableError, writing_for
from moorage.storage.encryption.driver import EncryptedDriver, SegmentReader
from moorage.storage.encryption.format import IntegrityError
from moorage.storage.manifests import parse_manifest

log = structlog.get_logger(__name__)

# Running digests kept for open upload sessions; a session whose digest was
# evicted is hashed again from storage when it finishes.
_MAX_CACHED_HASHERS = 1024
# Request bodies are hashed and stored in blocks of this size, in worker
# threads, while the event loop receives the next block. Two blocks per request
# are in memory at most.
UPLOAD_BLOCK_BYTES = 1024 * 1024
# Upload buffers kept for reuse per process (see _BlockSink).
SPARE_BUFFERS = 8
# A block up to this size is hashed in the event loop, because handing it to a
# worker thread and back costs about as much CPU as hashing it. sha256 of
# 64 KiB takes 50-60 us on a 2-core x86 VM with SHA extensions (timeit).
INLINE_HASH_BYTES = 64 * 1024
# A monolithic upload (one request with the whole blob, on a new session) up
# to this size is received in memory and stored with one `put`, which saves
# writing and then renaming the session's data file.
IN_MEMORY_BLOB_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest's identity as returned to clients after a push."""

    digest: str
    subject: str | None


class Registry:
    def __init__(
        self, store: RegistryStore, driver: StorageDriver, max_manifest_bytes: int
    ) -> None:
        self.store = store
        self.driver = driver
        self.max_manifest_bytes = max_manifest_bytes
        self._hashers: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        # A session's lock lives while a request holds it, so sessions that
        # clients abandon leave nothing behind.
        self._upload_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # Background deletes of upload data moved to trash (see _move_to_trash),
        # kept here so that they are not garbage collected while they run.
        self._trash_tasks: set[asyncio.Task[None]] = set()
        # The layer that wraps blob data keys per owner, when blobs are encrypted
        # with owner keys.
        self._keys: EncryptedDriver | None = None
        if isinstance(driver, EncryptedDriver) and driver.custody is not None:
            self._keys = driver

    async def _share_key(self, repository: str, digest: str) -> None:
        """Wrap the blob's data key for the owner of `repository` too."""
        if self._keys is None or self._keys.custody is None:
            return
        owner = await self._keys.custody.owner_of_repository(repository)
        await self._keys.share(paths.blob_path(parse_digest(digest)), owner, digest)

    async def _release_key(self, repository: str, digest: str) -> None:
        """Drop the wrap of `repository`'s owner when it no longer uses the blob."""
        if self._keys is None or self._keys.custody is None:
            return
        owner = await self._keys.custody.owner_of_repository(repository)
        await self._keys.release(paths.blob_path(parse_digest(digest)), owner, digest)

    async def release_key(self, repository: str, digest: str) -> None:
        """Drop the wrap of `repository`'s owner when it no longer uses the blob
        (after garbage collection deleted its link)."""
        await self._release_key(repository, digest)

    # Blobs

    async def blob_size(self, repository: str, digest: str) -> int:
        """Return the size of a blob visible in `repository`; raise BlobUnknownError.

        A blob that shredding marked unreadable is not found, from the same
        database read, so HEAD and GET agree without opening its data key.
        """
        parse_digest(digest)
        blob = await self.store.blob_in_repository(repository, digest)
        if blob is None:
            raise BlobUnknownError(detail={"digest": digest})
        if blob.shredded:
            raise _shredded_blob(digest)
        return blob.size

    async def read_blob(
        self, digest: str, offset: int, length: int
    ) -> AsyncIterator[bytes | memoryview]:
        """Open a blob's bytes; the caller has checked visibility with blob_size."""
        stream = self.driver.read(paths.blob_path(parse_digest(digest)), offset, length)
        first: bytes | memoryview
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = b""
        except PathNotFoundError:
            log.error("blob missing from storage", digest=digest)
            raise BlobUnknownError(detail={"digest": digest}) from None
        except DataKeyUnavailableError:
            # The driver has logged it. The content is gone on purpose, so the
            # client gets a not-found, not a server error. Shredding marks the
            # blobs it can map to a digest, so this is reached only by the
            # others, or by a read that began before the shredding committed.
            raise _shredded_blob(digest) from None
        return _prepend(first, stream)

    async def open_blob_reader(
        self, digest: str, offset: int, length: int
    ) -> SegmentReader | None:
        """Open an encrypted blob's local file for reading and sending in a worker
        thread, or return None when the driver does not encrypt it or has no
        local file. The caller has checked visibility with blob_size."""
        if not isinstance(self.driver, EncryptedDriver):
            return None
        path = paths.blob_path(parse_digest(digest))
        try:
            reader = await self.driver.open_reader(path, offset, length)
        except PathNotFoundError:
            log.error("blob missing from storage", digest=digest)
            raise BlobUnknownError(detail={"digest": digest}) from None
        except DataKeyUnavailableError:
            raise _shredded_blob(digest) from None
        if reader is None:
            return None
        # Damage in the first run then gets an error response, not a cut one.
        try:
            await reader.read_first()
        except BaseException:
            reader.close()
            raise
        return reader

    async def open_blob_file(self, digest: str) -> BinaryIO | None:
        """Open a blob's local file for zero-copy sending, or return None when the
        driver has none (an object store, or encryption at rest)."""
        try:
            return await self.driver.open_file(paths.blob_path(parse_digest(digest)))
        except PathNotFoundError:
            log.error("blob missing from storage", digest=digest)
            raise BlobUnknownError(detail={"digest": digest}) from None

    async def delete_blob(self, repository: str, digest: str) -> None:
        parse_digest(digest)
        if not await self.store.unlink_blob(repository, digest):
            raise BlobUnknownError(detail={"digest": digest})
        await self._release_key(repository, digest)

    async def mount_blob(self, repository: str, source: str, digest: str) -> int | None:
        """Link a blob from `source`; return its size, or None when it is not there.

        The blob's data key is wrapped for the new repository's owner before the
        link is recorded, so a crash between the two leaves no link without a
        wrap. A blob whose data key no key unwraps any more (shredded, or its
        wraps lost) is not mounted: the client uploads it instead, which
        replaces the stored copy.
        """
        parse_digest(digest)
        if await self.store.blob_size_in_repository(source, digest) is None:
            return None
        try:
            await self._share_key(repository, digest)
        except IntegrityError:
            # The driver has logged why: a warning when shredded, else an error.
            log.warning("blob to mount has no usable data key", digest=digest)
            return None
        size = await self.store.mount_blob(source, repository, digest)
        if size is not None:
            await self._share_key(repository, digest)
        return size

    # Upload sessions

    async def start_upload(self, repository: str) -> UploadRecord:
        return await self.store.create_upload(repository)

    async def get_upload(self, repository: str, upload_id: str) -> UploadRecord:
        upload = await self.store.get_upload(repository, upload_id)
        if upload is None:
            raise UploadUnknownError(detail={"upload": upload_id[:100]})
        return upload

    async def append(
        self,
        repository: str,
        upload_id: str,
        body: AsyncIterator[bytes],
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> UploadRecord:
        """Append a request body to an upload session.

        `start` is the first offset of a chunk sent with Content-Range; it must
        equal the bytes received so far. The body is appended whole or not at all.
        """
        async with self._lock(upload_id):
            upload = await self.get_upload(repository, upload_id)
            _check_chunk_start(upload, start)
            new_size = await self._write(upload, body, length)
            return UploadRecord(upload.id, repository, new_size, upload.created_at)

    async def finish_upload(
        self,
        repository: str,
        upload_id: str,
        digest: str,
        body: AsyncIterator[bytes] | None,
        length: int | None = None,
        *,
        start: int | None = None,
    ) -> int:
        """Append an optional last chunk, verify the digest and commit the blob.

        `start` is the first offset of a last chunk sent with Content-Range. When
        it is not the bytes received so far, RangeInvalidError is raised and the
        session is left unchanged. On a digest mismatch the session is cancelled,
        so nothing of it remains.
        """
        expected = parse_digest(digest)
        async with self._lock(upload_id):
            upload = await self.get_upload(repository, upload_id)
            _check_chunk_start(upload, start)
            size = upload.size
            data: bytes | None = None
            if body is not None and upload.size == 0 and _fits_in_memory(length):
                # A small blob in one request is never written to the session's
                # data: it goes to its place under blobs/ in one driver call.
                data = await _read_body(body, length)
                size = len(data)
                actual = await _digest_of(data, expected.algorithm)
            elif body is not None:
                # The new size is not recorded: the commit below deletes the
                # session in the transaction that links the blob.
                size = await self._write(upload, body, length, record=False)
                actual = await self._session_digest(upload_id, size, expected.algorithm)
            else:
                await self._drop_unrecorded_bytes(upload)
                actual = await self._session_digest(upload_id, size, expected.algorithm)
            if actual != expected:
                await self._discard(upload_id)
                raise DigestInvalidError(
                    f"uploaded content has digest {actual}, not {expected}",
                    detail={"digest": str(expected)},
                )
            await self._commit(upload, expected, size, data)
        self._hashers.pop(upload_id, None)
        return size

    async def cancel_upload(self, repository: str, upload_id: str) -> None:
        async with self._lock(upload_id):
            await self.get_upload(repository, upload_id)
            await self._discard(upload_id)

    async def upload_whole(
        self,
        repository: str,
        digest: str,
        body: AsyncIterator[bytes],
        length: int | None,
    ) -> int:
        """Receive a blob in one request (POST with `digest`)."""
        parse_digest(digest)
        upload = await self.start_upload(repository)
        try:
            return await self.finish_upload(repository, upload.id, digest, body, length)
        except BaseException:
            await self._discard(upload.id)
            raise

    async def _write(
        self,
        upload: UploadRecord,
        body: AsyncIterator[bytes],
        length: int | None,
        *,
        record: bool = True,
    ) -> int:
        """Append `body` to the session's data; return the session's new size.

        With `record`, the new size is stored in the database as well, unless
        another request changed the session meanwhile (UploadInvalidError).
        """
        writer = await self._open_session_data(upload)
        hasher = self._running_hasher(upload.id, upload.size)
        sink = _BlockSink(writer, hasher, length)
        try:
            received = 0
            async for chunk in body:
                received += len(chunk)
                await sink.add(chunk)
            await sink.flush()
            if length is not None and received != length:
                raise SizeInvalidError(
                    f"received {received} bytes but Content-Length was {length}"
                )
            # A chunk (PATCH) is not synced, because the final PUT syncs the
            # whole file before the blob is moved into place. A chunk lost to a
            # power loss makes that PUT fail its digest check, so no wrong blob
            # is stored.
            new_size = await writer.commit(sync=not record)
        except BaseException:
            await sink.abandon()
            await writer.cancel()
            self._hashers.pop(upload.id, None)
            raise
        if record and not await self.store.advance_upload(
            upload.id, upload.size, new_size
        ):
            # Another process appended to the same session meanwhile.
            self._hashers.pop(upload.id, None)
            raise UploadInvalidError("the upload session changed during this request")
        if hasher is not None:
            self._remember_hasher(upload.id, new_size, hasher)
        return new_size

    async def _drop_unrecorded_bytes(self, upload: UploadRecord) -> None:
        """Cut the session's data to the size recorded in the database.

        A request that died with its process may have written bytes past that
        size; the blob must not contain them.
        """
        if upload.size == 0:
            return
        writer = await self._open_session_data(upload)
        await writer.commit()

    async def _open_session_data(self, upload: UploadRecord) -> FileWriter:
        """Open the session's data to append at its recorded size.

        When storage lost that data (for example after a crash between moving a
        blob into place and recording it), the session is cancelled and the
        client gets BLOB_UPLOAD_UNKNOWN, so it starts a new upload.
        """
        path = paths.upload_data_path(upload.id)
        try:
            with writing_for(upload.repository):
                return await self.driver.writer(path, upload.size)
        except PathNotFoundError:
            log.error(
                "upload data missing from storage; session cancelled",
                upload_id=upload.id,
                size=upload.size,
            )
            await self._discard(upload.id)
            raise UploadUnknownError(
                "the upload's data is missing from storage; start a new upload",
                detail={"upload": upload.id},
            ) from None
        except DataKeyUnavailableError:
            raise await self._shredded_upload(upload.id) from None

    async def _shredded_upload(self, upload_id: str) -> UploadUnknownError:
        """Cancel a session whose data key was destroyed by shredding its
        owner, and return the error that tells the client to start again."""
        log.warning("upload data key destroyed; session cancelled", upload_id=upload_id)
        await self._discard(upload_id)
        return UploadUnknownError(
            "the upload's data key was destroyed when its customer's key was "
            "shredded; start a new upload",
            detail={"upload": upload_id},
        )

    def _running_hasher(self, upload_id: str, size: int) -> Any | None:
        """Return a copy of the session's running sha256, or None if unknown."""
        if size == 0:
            return new_hasher("sha256")
        cached = self._hashers.get(upload_id)
        if cached is None or cached[0] != size:
            return None
        return cached[1].copy()

    def _remember_hasher(self, upload_id: str, size: int, hasher: Any) -> None:
        self._hashers[upload_id] = (size, hasher)
        self._hashers.move_to_end(upload_id)
        while len(self._hashers) > _MAX_CACHED_HASHERS:
            self._hashers.popitem(last=False)

    async def _session_digest(
        self, upload_id: str, size: int, algorithm: str
    ) -> Digest:
        cached = self._hashers.get(upload_id)
        if algorithm == "sha256" and cached is not None and cached[0] == size:
            return Digest(algorithm, cached[1].hexdigest())
        hasher = new_hasher(algorithm)
        if size > 0:
            try:
                async for chunk in self.driver.read(
                    paths.upload_data_path(upload_id), 0, size
                ):
                    await asyncio.to_thread(hasher.update, chunk)
            except DataKeyUnavailableError:
                raise await self._shredded_upload(upload_id) from None
        return Digest(algorithm, hasher.hexdigest())

    async def _commit(
        self, upload: UploadRecord, digest: Digest, size: int, data: bytes | None
    ) -> None:
        """Put a verified upload in place and make the blob visible.

        The blob's bytes are `data` when given, else the session's data.

        Durability: the data and then its name under `blobs/` are fsynced (by
        the writer's commit and `move`, or by `put`) before the transaction
        that links the blob, so a blob that a repository shows survives a
        crash. A crash before that transaction leaves at most an unlinked file
        under `blobs/`, which the next upload of the same digest replaces.

        Garbage collection: when a copy is stored already, the session's data
        is kept until the link has committed and the copy is seen still in
        place. The collector moves a blob's file away inside the transaction
        that deletes its row, and that transaction holds the row lock (or
        SQLite's write lock) that the link waits for, so a copy that is gone
        after the link is replaced from the session's data. A copy that is
        still there then stays, because the committed link keeps its row.
        """
        repository, upload_id = upload.repository, upload.id
        target = paths.blob_path(digest)
        stored = await self._stored_copy_usable(repository, digest, target)
        if not stored:
            await self._place(upload_id, target, repository, size, data)
        linked = await self.store.link_blob(
            repository,
            str(digest),
            size,
            finished_upload=upload_id,
            upload_size=upload.size,
        )
        if not linked:
            # Another request appended to or cancelled the same session meanwhile.
            # The blob's file may be in place already, but nothing links it.
            self._hashers.pop(upload_id, None)
            raise UploadInvalidError("the upload session changed during this request")
        if stored:
            if await self.driver.exists(target):
                if data is None and size > 0:
                    await self._move_to_trash(upload_id)
            else:
                log.info("stored copy removed by garbage collection; storing upload")
                await self._place(upload_id, target, repository, size, data)
            # NOTE: a process that stops between the link and here leaves the
            # session's data under uploads/, which nothing deletes.
            await self.driver.delete(paths.upload_dir(upload_id))
        # Again after the link: a concurrent delete of the blob in another of
        # the owner's repositories may have dropped the wrap before the link
        # committed. A delete that begins after this check sees the link.
        await self._share_key(repository, str(digest))

    async def _place(
        self,
        upload_id: str,
        target: str,
        repository: str,
        size: int,
        data: bytes | None,
    ) -> None:
        """Store the upload's bytes at `target`: `data`, or the session's data."""
        if data is not None or size == 0:
            with writing_for(repository):
                await self.driver.put(target, data or b"")
        else:
            await self.driver.move(paths.upload_data_path(upload_id), target)
        # With `data`, the directory exists only when an earlier request on
        # this session died after writing to it.
        await self.driver.delete(paths.upload_dir(upload_id))

    async def _stored_copy_usable(
        self, repository: str, digest: Digest, target: str
    ) -> bool:
        """Check that a blob is stored already and wrap its data key for `repository`.

        A stored copy whose data key no key here unwraps (every owner that
        referenced it was shredded, or its wraps were lost) is replaced by the
        upload, whose digest has been checked.
        """
        if not await self.store.blob_exists(str(digest)):
            return False
        if not await self.driver.exists(target):
            return False
        try:
            await self._share_key(repository, str(digest))
        except IntegrityError:
            # The driver has logged why: a warning when shredded, else an error.
            log.warning(
                "stored blob has no usable data key; replacing it with the upload",
                digest=str(digest),
            )
            return False
        return True

    async def _move_to_trash(self, upload_id: str) -> None:
        """Rename a session's data, a copy of a stored blob, into `trash/` and
        delete it in the background.

        Deleting a large file takes the filesystem a while (about 0.3 s per GiB on
        ext4 with `discard`), and the client need not wait for it. A process
        that stops before the delete leaves the file in `trash/`, which
        `empty_trash` clears at start-up and then periodically.
        """
        key = paths.trash_path(upload_id)
        await self.driver.move(paths.upload_data_path(upload_id), key)
        task = asyncio.create_task(self._delete_trash(key))
        self._trash_tasks.add(task)
        task.add_done_callback(self._trash_tasks.discard)

    async def _delete_trash(self, key: str) -> None:
        try:
            await self.driver.delete(key)
        except Exception:
            # The next `empty_trash` tries again.
            log.exception("deleting upload data from trash failed", path=key)

    async def empty_trash(self) -> int:
        """Delete what `_move_to_trash` left behind; return the count deleted.

        An entry may be one that another process is deleting at the same time,
        which is harmless: a delete of a missing key is no error.
        """
        keys = await self.driver.list(paths.TRASH_PREFIX)
        for key in keys:
            await self.driver.delete(key)
        return len(keys)

    async def wait_for_trash(self) -> None:
        """Wait until the background deletes started so far have finished."""
        while self._trash_tasks:
            await asyncio.gather(*self._trash_tasks, return_exceptions=True)

    async def _discard(self, upload_id: str) -> None:
        await self.driver.delete(paths.upload_dir(upload_id))
        await self.store.delete_upload(upload_id)
        self._hashers.pop(upload_id, None)

    async def purge_stale_uploads(self, older_than: datetime) -> int:
        """Cancel upload sessions that received nothing since `older_than`."""
        stale = await self.store.list_stale_uploads(older_than)
        for upload_id in stale:
            await self._discard(upload_id)
        return len(stale)

    def _lock(self, upload_id: str) -> asyncio.Lock:
        return self._upload_locks.setdefault(upload_id, asyncio.Lock())

    # Manifests

    async def get_manifest(self, repository: str, reference: str) -> ManifestRecord:
        if is_digest(reference):
            parse_digest(reference)
        else:
            validate_tag(reference)
        manifest = await self._read_manifest(repository, reference)
        if manifest is None:
            raise ManifestUnknownError(detail={"reference": reference})
        return manifest

    async def _read_manifest(
        self, repository: str, reference: str
    ) -> ManifestRecord | None:
        """Read a manifest by digest or tag. One sealed under a shredded owner
        key raises ManifestUnknownError, saying so."""
        try:
            if is_digest(reference):
                return await self.store.get_manifest(repository, reference)
            return await self.store.get_tagged_manifest(repository, reference)
        except DataKeyUnavailableError as error:
            log.info(
                "manifest data key destroyed",
                repository=repository,
                reference=reference,
                reason=error.reason,
            )
            raise ManifestUnknownError(
                "manifest content is no longer readable: the key of the owner "
                "of its repository was shredded",
                detail={"reference": reference, "reason": "data key destroyed"},
            ) from None

    async def put_manifest(
        self, repository: str, reference: str, content_type: str | None, body: bytes
    ) -> StoredManifest:
        """Validate and store a manifest under a tag or its digest."""
        tag: str | None = None
        algorithm = "sha256"
        if is_digest(reference):
            algorithm = parse_digest(reference).algorithm
        else:
            tag = validate_tag(reference)
        parsed = parse_manifest(body, content_type, algorithm, self.max_manifest_bytes)
        if tag is None and str(parsed.digest) != reference:
            raise DigestInvalidError(
                f"manifest digest is {parsed.digest}, not {reference}",
                detail={"digest": reference},
            )
        await self.store.put_manifest(repository, parsed.record, tag)
        return StoredManifest(str(parsed.digest), parsed.record.subject_digest)

    async def delete_manifest(self, repository: str, reference: str) -> None:
        """Delete a manifest by digest (with its tags), or only a tag."""
        if is_digest(reference):
            parse_digest(reference)
            deleted = await self.store.delete_manifest(repository, reference)
        else:
            validate_tag(reference)
            deleted = await self.store.delete_tag(repository, reference)
        if not deleted:
            raise ManifestUnknownError(detail={"reference": reference})

    async def list_tags(
        self, repository: str, limit: int | None, last: str | None
    ) -> list[str]:
        found = await self.store.list_tags(repository, limit, last)
        if found is None:
            raise NameUnknownError(detail={"name": repository})
        return found

    async def referrers(
        self, repository: str, subject: str, artifact_type: str | None
    ) -> list[ReferrerRecord]:
        parse_digest(subject)
        return await self.store.list_referrers(repository, subject, artifact_type)


class _BlockSink:
    """Collects a request body into blocks; hashes and stores them off the loop.

    Each full block is hashed (in one worker thread) and written (in another)
    while the next block arrives. Two buffers alternate, so memory stays at two
    blocks however large the body is, and the caller's chunks are copied once.
    Full-size buffers go back to a small pool when the body is stored: a fresh
    one costs its page faults again, on every PATCH of a chunked upload.
    Full-size buffers are anonymous memory maps, so they start on a page
    boundary and the filesystem driver can write them with O_DIRECT.
    """

    _spare: ClassVar[list[mmap.mmap]] = []

    def __init__(self, writer: FileWriter, hasher: Any | None, length: int | None):
        self._writer = writer
        self._hasher = hasher
        # A small body of known length gets a buffer of its own size.
        self._block_bytes = min(length or UPLOAD_BLOCK_BYTES, UPLOAD_BLOCK_BYTES)
        self._buffers: list[bytearray | mmap.mmap] = []
        self._current = 0
        self._filled = 0
        self._pending: asyncio.Future[None] | None = None

    async def add(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            buffer = self._buffer()
            taken = min(len(view), len(buffer) - self._filled)
            buffer[self._filled : self._filled + taken] = view[:taken]
            self._filled += taken
            view = view[taken:]
            if self._filled == len(buffer):
                await self._hand_off()

    async def flush(self) -> None:
        """Store what is buffered and wait until every block is written."""
        if self._filled:
            await self._hand_off()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        self._release()

    async def abandon(self) -> None:
        """Wait for the block in flight, ignoring its outcome, before a cancel."""
        if self._pending is not None:
            await asyncio.gather(self._pending, return_exceptions=True)
            self._pending = None
        self._release()

    def _buffer(self) -> bytearray | mmap.mmap:
        if len(self._buffers) <= self._current:
            if self._block_bytes < UPLOAD_BLOCK_BYTES:
                self._buffers.append(bytearray(max(self._block_bytes, 1)))
            elif self._spare:
                self._buffers.append(self._spare.pop())
            else:
                self._buffers.append(mmap.mmap(-1, UPLOAD_BLOCK_BYTES))
        return self._buffers[self._current]

    def _release(self) -> None:
        """Give the buffers to the pool; no block of this body is in flight."""
        for buffer in self._buffers:
            if isinstance(buffer, mmap.mmap) and len(self._spare) < SPARE_BUFFERS:
                self._spare.append(buffer)
        self._buffers = []

    async def _hand_off(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        block = memoryview(self._buffers[self._current])[: self._filled]
        self._pending = asyncio.ensure_future(self._store(block))
        self._current ^= 1
        self._filled = 0

    async def _store(self, block: memoryview) -> None:
        if self._hasher is None:
            await self._writer.write(block)
            return
        if len(block) <= INLINE_HASH_BYTES:
            self._hasher.update(block)
            await self._writer.write(block)
            return
        await asyncio.gather(
            asyncio.to_thread(self._hasher.update, block), self._writer.write(block)
        )


def _check_chunk_start(upload: UploadRecord, start: int | None) -> None:
    """Raise RangeInvalidError unless a chunk starts where the session ends."""
    if start is not None and start != upload.size:
        raise RangeInvalidError(
            f"chunk starts at {start} but the upload has {upload.size} bytes; "
            "send chunks in order without gaps or overlaps",
            size=upload.size,
        )


def _fits_in_memory(length: int | None) -> bool:
    return length is not None and length <= IN_MEMORY_BLOB_BYTES


async def _read_body(body: AsyncIterator[bytes], length: int | None) -> bytes:
    """Read a small request body whole; raise SizeInvalidError on a short one."""
    received = bytearray()
    async for chunk in body:
        received += chunk
    if length is not None and len(received) != length:
        raise SizeInvalidError(
            f"received {len(received)} bytes but Content-Length was {length}"
        )
    return bytes(received)


async def _digest_of(data: bytes, algorithm: str) -> Digest:
    hasher = new_hasher(algorithm)
    if len(data) <= INLINE_HASH_BYTES:
        hasher.update(data)
    else:
        await asyncio.to_thread(hasher.update, data)
    return Digest(algorithm, hasher.hexdigest())


async def _prepend(
    first: bytes | memoryview, rest: AsyncIterator[bytes | memoryview]
) -> AsyncIterator[bytes | memoryview]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


def _shredded_blob(digest: str) -> BlobUnknownError:
    """The error for a blob whose data key no key unwraps.

    The driver has logged it. The content is gone on purpose, so the client
    gets a not-found, not a server error.
    """
    return BlobUnknownError(
        "blob content is no longer readable: its data key was destroyed "
        "when the keys of every owner that used it were shredded",
        detail={"digest": digest, "reason": "data key destroyed"},
    )
