"""A storage driver on a local directory."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from moorage.fsync import fsync_directory, start_writeback, wait_for_writeback
from moorage.storage.drivers.base import (
    Claim,
    FileInfo,
    FileWriter,
    PathNotFoundError,
    StorageDriver,
)

READ_CHUNK_BYTES = 1024 * 1024
WRITE_BUFFER_BYTES = 1024 * 1024
# While a large object is written, its data is flushed to disk in the
# background every this many bytes, so that the disk works while the rest
# arrives and the fsync at commit has little left to do.
EARLY_SYNC_BYTES = 32 * 1024 * 1024
# A file at least this large is unlinked in a worker thread: freeing its
# blocks takes the filesystem time (about 0.3 s for 1 GiB on ext4 with `discard`).
UNLINK_IN_THREAD_BYTES = 1024 * 1024
# Stored objects are readable by the server's user only, whatever the umask.
STORED_FILE_MODE = 0o600
# A large block whose memory, file offset and length are multiples of this is
# written with O_DIRECT, past the page cache (see `_write_block`).
DIRECT_ALIGNMENT = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# NOTE: aligned upload blocks can go past the page cache with O_DIRECT, which
# cut a 1 GiB push's kernel CPU, but then the first pull of a new blob reads
# it from disk: a single-client pull right after a push ran at 0.30 of
# distribution's speed. Off until the pull side makes up for it.
DIRECT_WRITES = False


class FilesystemDriver(StorageDriver):
    """Keys map to files under `root`; `move` is a rename within one filesystem."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self.root)
        self._root_prefix = os.path.join(self._root_text, "")

    def _full_path(self, path: str) -> str:
        # A lexical check. Path.resolve() calls lstat on every component: 35 us
        # per key against 5 us, and an upload builds several keys. The result
        # is a string: a Path object costs more to build and to convert again
        # for each system call than the call itself on a small push.
        full = os.path.normpath(os.path.join(self._root_text, path))
        if full != self._root_text and not full.startswith(self._root_prefix):
            raise ValueError(f"storage path escapes the root: {path!r}")
        return full

    async def stat(self, path: str) -> FileInfo:
        try:
            result = os.stat(self._full_path(path))
        except FileNotFoundError:
            raise PathNotFoundError(path) from None
        return FileInfo(path, result.st_size, result.st_mtime)

    async def read(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        try:
            fd = os.open(self._full_path(path), os.O_RDONLY)
        except FileNotFoundError:
            raise PathNotFoundError(path) from None
        # The next chunk is read in a worker thread while the caller handles
        # this one (decrypts it, sends it), so reading and sending overlap.
        pending: asyncio.Future[bytes] | None = None
        try:
            remaining = length if length is not None else os.fstat(fd).st_size - offset
            position = offset
            loop = asyncio.get_running_loop()
            if remaining > 0:
                want = min(READ_CHUNK_BYTES, remaining)
                pending = loop.run_in_executor(None, os.pread, fd, want, position)
            while pending is not None:
                chunk = await pending
                pending = None
                if not chunk:
                    break
                position += len(chunk)
                remaining -= len(chunk)
                if remaining > 0:
                    want = min(READ_CHUNK_BYTES, remaining)
                    pending = loop.run_in_executor(None, os.pread, fd, want, position)
                yield chunk
        finally:
            if pending is not None and not pending.done():
                # The reader stopped early: close the descriptor when the read
                # ahead finishes. (After a cancel, a read still running in its
                # thread may find it closed. Its result is discarded either way.)
                pending.add_done_callback(lambda _: os.close(fd))
            else:
                os.close(fd)

    async def open_file(self, path: str) -> BinaryIO | None:
        # Opening a local file does not wait for the disk long enough to need
        # a worker thread; `read` opens inline as well.
        try:
            fd = os.open(self._full_path(path), os.O_RDONLY)
        except FileNotFoundError:
            raise PathNotFoundError(path) from None
        return os.fdopen(fd, "rb", buffering=0)

    async def writer(self, path: str, offset: int = 0) -> FileWriter:
        full = self._full_path(path)
        try:
            if offset == 0:
                # Creating a file and its directory may wait for the journal,
                # so it runs in a worker thread.
                fd = await asyncio.to_thread(_create_for_writing, full)
            else:
                # Reopening a file to append takes an open and an fstat, which
                # do not wait for the disk, so they run inline and each PATCH
                # of a chunked upload saves a thread hop. A file of another
                # size, such as one that a dead request wrote past `offset`,
                # is cut in a worker thread.
                fd = os.open(full, os.O_WRONLY)
                await _cut_to(fd, offset)
        except FileNotFoundError:
            raise PathNotFoundError(path) from None
        direct_fd = _open_direct(full) if DIRECT_WRITES else None
        return _FilesystemWriter(fd, offset, fsync=self.fsync, direct_fd=direct_fd)

    async def put(self, path: str, data: bytes) -> None:
        full = self._full_path(path)
        directory, name = os.path.split(full)
        temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        await asyncio.to_thread(_put_file, temporary, full, data, self.fsync)

    async def move(self, source: str, destination: str) -> None:
        source_path = self._full_path(source)
        target = self._full_path(destination)
        try:
            await asyncio.to_thread(_move, source_path, target, self.fsync)
        except FileNotFoundError:
            raise PathNotFoundError(source) from None

    async def claim(self, path: str, destination: str, placed_before: float) -> Claim:
        return await asyncio.to_thread(
            _claim, self._full_path(path), self._full_path(destination), placed_before
        )

    async def delete(self, path: str) -> None:
        full = self._full_path(path)
        try:
            info = os.lstat(full)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            await asyncio.to_thread(_remove_directory, full)
        elif info.st_size >= UNLINK_IN_THREAD_BYTES:
            await asyncio.to_thread(_unlink, full)
        else:
            _unlink(full)

    async def list(self, prefix: str) -> list[str]:
        return _list_keys(self.root, self._full_path(prefix))

    async def check(self) -> None:
        """Raise OSError when the root is missing, not a directory, or lacks
        read, write or search permission for this process."""
        # os.stat, os.access and os.scandir raise FileNotFoundError,
        # NotADirectoryError or PermissionError with the root's path.
        # NOTE: a root that was replaced by a new, empty directory passes.
        if not stat.S_ISDIR(os.stat(self._root_text).st_mode):
            raise NotADirectoryError(
                f"storage root {self._root_text} is not a directory"
            )
        if not os.access(self._root_text, os.R_OK | os.W_OK | os.X_OK):
            raise PermissionError(
                f"storage root {self._root_text} is not readable and writable"
            )
        with os.scandir(self._root_text) as entries:
            next(entries, None)


class _FilesystemWriter(FileWriter):
    """Appends to a file. Large aligned blocks go to disk with O_DIRECT, the
    rest through the page cache with early writeback (see `_write_block`)."""

    def __init__(
        self, fd: int, offset: int, *, fsync: bool, direct_fd: int | None = None
    ) -> None:
        self._fd = fd
        # The same file opened with O_DIRECT, or None where the filesystem rejects it.
        self._direct_fd = direct_fd
        self._start = offset
        self._written = offset
        self._buffer = bytearray()
        self._fsync = fsync
        self._closed = False
        self._synced = offset
        self._syncing: asyncio.Future[None] | None = None

    @property
    def size(self) -> int:
        return self._written + len(self._buffer)

    async def write(self, data: bytes | memoryview) -> None:
        if not self._buffer and len(data) >= WRITE_BUFFER_BYTES:
            # A large block goes to the file as it is, without a copy.
            how = await asyncio.to_thread(
                _write_block, self._fd, self._direct_fd, data, self._written
            )
            self._written += len(data)
            if how == _DIRECT:
                # On the disk already: nothing for an early sync to write.
                self._synced += len(data)
                return
            if how == _REJECTED:
                self._close_direct()
            await self._sync_early()
            return
        self._buffer += data
        if len(self._buffer) >= WRITE_BUFFER_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        await asyncio.to_thread(_pwrite_all, self._fd, data, self._written)
        self._written += len(data)
        await self._sync_early()

    async def _sync_early(self) -> None:
        """Write the new range back in a worker thread, one range at a time.

        The thread starts writeback of the range and then waits for the
        ranges before it (`_write_back`), so that at most about two ranges
        are left for the final `fsync` whatever the disk's speed. Unlike the
        `fdatasync` used before, this commits no journal and flushes no disk
        cache every 32 MiB. A Python loop writing 1 GiB in 1 MiB blocks took
        0.26-0.61 s of system CPU with `sync_file_range` every 32 MiB against
        0.65-0.80 s with `fdatasync` (ext4 on a 2-core VM, load 9-10).
        """
        if not self._fsync or self._written - self._synced < EARLY_SYNC_BYTES:
            return
        if self._syncing is not None:
            if not self._syncing.done():
                return
            await self._syncing  # raises the error of a failed sync
        start, self._synced = self._synced, self._written
        self._syncing = asyncio.ensure_future(
            asyncio.to_thread(
                _write_back, self._fd, self._start, start, self._written - start
            )
        )

    async def _wait_for_sync(self) -> None:
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            await syncing

    async def commit(self, *, sync: bool = True) -> int:
        await self._wait_for_sync()
        # The rest of the data and the fsync go to the same worker thread.
        # Without `sync` (an upload's chunk), the kernel is asked to start
        # writing back each range of EARLY_SYNC_BYTES that the chunk completed,
        # so that the fsync when the upload finishes has little left to do and
        # dirty pages do not pile up over a large upload. A chunk that
        # completes no range and has nothing buffered needs no worker thread.
        data = bytes(self._buffer)
        self._buffer.clear()
        sync = self._fsync and sync
        writeback = None
        if self._fsync and not sync:
            writeback = _completed_ranges(self._start, self._written + len(data))
        if data or sync or writeback is not None:
            await asyncio.to_thread(
                _write_and_sync, self._fd, data, self._written, sync, writeback
            )
        self._written += len(data)
        self._close()
        return self._written

    async def cancel(self) -> None:
        if self._closed:
            return
        # The descriptor stays open until a background sync has finished with it.
        await asyncio.gather(self._wait_for_sync(), return_exceptions=True)
        self._buffer.clear()
        os.ftruncate(self._fd, self._start)
        self._written = self._start
        self._close()

    def _close_direct(self) -> None:
        """Stop writing with O_DIRECT, after the filesystem rejected a block."""
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_direct()
            os.close(self._fd)


def _list_keys(root: Path, prefix: str) -> list[str]:
    """Return the keys of the files under `prefix`, except temporary ones."""
    base = Path(prefix)
    if not base.exists():
        return []
    keys = [
        str(file.relative_to(root))
        for file in base.rglob("*")
        if file.is_file() and not file.name.endswith(".tmp")
    ]
    return sorted(keys)


_DIRECT, _BUFFERED, _REJECTED = "direct", "buffered", "rejected"


def _write_block(
    fd: int, direct_fd: int | None, data: bytes | memoryview, offset: int
) -> str:
    """Write a large block at `offset`; return how: _DIRECT with O_DIRECT,
    _BUFFERED through the page cache, _REJECTED through the page cache after
    the filesystem rejected O_DIRECT.

    Writing through the page cache costs the kernel a copy, page allocation and
    later writeback: about 1 s of system CPU per GiB on a 2-core VM, against
    0.1 s with O_DIRECT, which sends the block from its memory to the disk.
    O_DIRECT needs the memory address, the offset and the length aligned, so
    only blocks from page-aligned buffers (see `_BlockSink` in the registry)
    qualify; any other write goes through the page cache. The data is durable
    only after the fsync at commit either way: O_DIRECT does not flush the
    disk's write cache nor the file's metadata.
    """
    # NOTE: only plaintext uploads get here with aligned blocks. The encrypted
    # driver writes sealed 64 KiB segments plus nonce and tag, so its offsets
    # are never aligned and it still pays the page cache's cost. A chunked
    # upload whose chunk sizes are not multiples of 4 KiB goes through the
    # page cache from its second chunk on, for the same reason.
    if (
        direct_fd is not None
        and offset % DIRECT_ALIGNMENT == 0
        and len(data) % DIRECT_ALIGNMENT == 0
        and _is_aligned(data)
    ):
        try:
            _pwrite_all(direct_fd, data, offset)
        except OSError as error:
            # A filesystem may reject O_DIRECT writes although the open succeeded, so
            # the block is written again through the page cache.
            if error.errno != errno.EINVAL:
                raise
            _pwrite_all(fd, data, offset)
            return _REJECTED
        return _DIRECT
    _pwrite_all(fd, data, offset)
    return _BUFFERED


def _is_aligned(data: bytes | memoryview) -> bool:
    """Return whether `data` is writable memory starting on an aligned address."""
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError, BufferError):
        return False
    return address % DIRECT_ALIGNMENT == 0


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_and_sync(
    fd: int,
    data: bytes,
    offset: int,
    sync: bool,
    writeback: tuple[int, int] | None,
) -> None:
    """Write the rest of the data at `offset`. Then sync the file, or start
    writing back the `writeback` range, given as (offset, length)."""
    _pwrite_all(fd, data, offset)
    if sync:
        os.fsync(fd)
    elif writeback is not None:
        start_writeback(fd, *writeback)


def _completed_ranges(start: int, end: int) -> tuple[int, int] | None:
    """Return the file's ranges of EARLY_SYNC_BYTES, aligned to multiples of
    that size, that bytes `start` to `end` completed, as one (offset, length).

    The first range may begin before `start`, because the chunks that wrote
    its earlier bytes started no writeback for it. Return None when `start`
    and `end` lie in the same range.
    """
    first = start - start % EARLY_SYNC_BYTES
    last = end - end % EARLY_SYNC_BYTES
    if last <= first:
        return None
    return first, last - first


def _create_for_writing(path: str) -> int:
    """Create a file, or empty an existing one, and open it to write."""
    # An upload's data is synced, with its directory, only when it moves
    # into place.
    _make_directory(os.path.dirname(path), fsync=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, STORED_FILE_MODE)
    try:
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _cut_to(fd: int, offset: int) -> None:
    """Cut the open file to `offset` bytes unless it has that size already;
    close the descriptor when that fails."""
    try:
        if os.fstat(fd).st_size != offset:
            await asyncio.to_thread(os.ftruncate, fd, offset)
    except BaseException:
        os.close(fd)
        raise


def _open_direct(path: str) -> int | None:
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, os.O_WRONLY | _O_DIRECT)
    except OSError:
        return None


def _move(source: str, target: str, fsync: bool) -> None:
    """Rename `source` to `target`; with `fsync`, make the new name durable."""
    directory = os.path.dirname(target)
    _make_directory(directory, fsync=fsync)
    os.replace(source, target)
    if fsync:
        fsync_directory(directory)


def _claim(source: str, target: str, placed_before: float) -> Claim:
    """Rename `source` to `target` unless it was put in place after
    `placed_before` (see `StorageDriver.claim`).

    A rename or a new file sets the file's change time (ctime), which no
    caller can set back. A file replaced between the first lstat and the
    rename has another inode afterwards, and is renamed back.
    """
    try:
        before = os.lstat(source)
    except FileNotFoundError:
        return Claim.MISSING
    if before.st_ctime >= placed_before:
        return Claim.RECENT
    _make_directory(os.path.dirname(target), fsync=False)
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return Claim.MISSING
    after = os.lstat(target)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.rename(target, source)
        return Claim.RECENT
    return Claim.MOVED


def _make_directory(path: str, *, fsync: bool) -> None:
    """Create a directory and its missing parents.

    With `fsync`, the name of each directory created is made durable too:
    a new file's name in it survives a crash only if the directory does.
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        _make_directory(parent, fsync=fsync)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    if fsync:
        fsync_directory(parent)


def _remove_directory(path: str) -> None:
    # An upload's directory is empty once its data has moved into place, and
    # one rmdir is cheaper than shutil.rmtree walking it.
    try:
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _write_back(fd: int, first: int, offset: int, length: int) -> None:
    """Start writing back `length` bytes at `offset` and wait for the writeback
    of the bytes from `first` up to `offset`, started by earlier calls.

    Where the kernel has no call for that, sync the file instead.
    """
    if not start_writeback(fd, offset, length):
        os.fdatasync(fd)
        return
    wait_for_writeback(fd, first, offset - first)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _put_file(temporary: str, target: str, data: bytes, fsync: bool) -> None:
    """Write `data` to `temporary` and rename it to `target`.

    With `fsync`, the data and then the new name are durable when this returns.
    """
    directory = os.path.dirname(target)
    _make_directory(directory, fsync=fsync)
    descriptor = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, STORED_FILE_MODE
    )
    try:
        _pwrite_all(descriptor, data, 0)
        if fsync:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, target)
    if fsync:
        fsync_directory(directory)
