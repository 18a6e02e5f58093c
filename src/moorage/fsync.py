"""Durable files: the directory fsync that makes a new name survive a crash,
and the early writeback that makes a later fsync short."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_directory(path: str | Path) -> None:
    """Make the creation, rename or removal of a file in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range() if sys.platform == "linux" else None
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(descriptor: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing a file's range to disk, without waiting;
    return whether it was asked.

    A later fsync then has little left to do. This is Linux's sync_file_range
    (Python's os module has no binding for it); elsewhere it does nothing. It
    makes nothing durable on its own, so a failure is ignored.
    """
    if _sync_file_range is None or length <= 0:
        return False
    return _sync_file_range(descriptor, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


def wait_for_writeback(descriptor: int, offset: int, length: int) -> bool:
    """Wait until the writeback started on a file's range has finished; return
    whether the kernel was asked.

    Like `start_writeback`, this is sync_file_range and makes nothing durable:
    it neither writes the file's metadata nor flushes the disk's cache.
    """
    if _sync_file_range is None or length <= 0:
        return False
    flags = _SYNC_FILE_RANGE_WAIT_BEFORE
    return _sync_file_range(descriptor, offset, length, flags) == 0


def create_private_file(path: str | Path) -> BinaryIO:
    """Create `path`, which must not exist, readable and writable by its owner
    only (0600, whatever the umask), and open it for writing."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(descriptor, "wb")
