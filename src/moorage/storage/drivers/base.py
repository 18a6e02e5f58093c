"""The storage driver contract.

A driver stores opaque byte strings under slash-separated keys. The registry
never relies on anything a driver does beyond these methods, so an object store
with multipart uploads (S3) can implement them as well as a local filesystem:

- `writer` appends to one key over several calls (one upload session spans many
  HTTP requests and may continue on another process), and `FileWriter.cancel`
  rolls back whatever the current call appended.
- `move` is the commit point of a blob: the target key appears whole or not at
  all.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO


class Claim(enum.Enum):
    """What `StorageDriver.claim` did with an object."""

    # Moved to the destination.
    MOVED = "moved"
    # No object was there.
    MISSING = "missing"
    # The object was put in place after the time given, so it stayed.
    RECENT = "recent"


class PathNotFoundError(Exception):
    """No object is stored under the key."""

    def __init__(self, path: str) -> None:
        super().__init__(f"storage path not found: {path}")
        self.path = path


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    size: int
    modified: float


class FileWriter(ABC):
    """Appends bytes to one key; nothing is kept unless `commit` returns."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Total size of the object, including what this writer appended."""

    @abstractmethod
    async def write(self, data: bytes | memoryview) -> None:
        """Append `data`; the caller may reuse its buffer once this returns."""

    @abstractmethod
    async def commit(self, *, sync: bool = True) -> int:
        """Write out the appended bytes and return the total size.

        With `sync` they are durable when it returns; without it, a power loss
        may drop them (a process crash does not).
        """

    @abstractmethod
    async def cancel(self) -> None:
        """Discard what this writer appended; the object keeps its earlier size."""


class StorageDriver(ABC):
    """Stores byte strings under keys such as `blobs/sha256/ab/ab12...`."""

    @abstractmethod
    async def stat(self, path: str) -> FileInfo:
        """Return size and modification time; raise PathNotFoundError."""

    @abstractmethod
    def read(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        """Yield the bytes from `offset`, `length` of them or up to the end.

        A chunk may be a memoryview, for a driver that fills buffers of its own.

        Raises PathNotFoundError before yielding anything when the key is missing.
        """

    async def open_file(self, path: str) -> BinaryIO | None:
        """Open the object as a local file whose bytes are the object's, or return
        None (the default) when it has no such file.

        The server sends a file it gets here with `sendfile`, without copies.
        Raises PathNotFoundError when the key is missing.
        """
        return None

    @abstractmethod
    async def writer(self, path: str, offset: int = 0) -> FileWriter:
        """Open `path` to append at `offset`, creating it when `offset` is 0.

        Anything stored past `offset` (left by an interrupted writer) is dropped.
        Raises PathNotFoundError when `offset` > 0 and the key is missing.
        """

    @abstractmethod
    async def put(self, path: str, data: bytes) -> None:
        """Store a small object whole, replacing any earlier one atomically."""

    @abstractmethod
    async def move(self, source: str, destination: str) -> None:
        """Move an object; the destination appears whole or not at all."""

    @abstractmethod
    async def delete(self, path: str) -> None:
        """Delete an object, or every object under a prefix; missing is no error."""

    @abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Return the keys of all objects under `prefix`, sorted."""

    @abstractmethod
    async def check(self) -> None:
        """Raise OSError unless the store can be read and written, for `/readyz`."""

    async def claim(self, path: str, destination: str, placed_before: float) -> Claim:
        """Move the object at `path` to `destination`, unless it was put in
        place (written, or moved there) after `placed_before`, a Unix time.

        Garbage collection takes a blob's file away with this, inside the
        transaction that deletes the blob's row, so that an upload that put
        a new copy there since its last check keeps it. An object that
        replaces the one at `path` while this runs stays too (Claim.RECENT).
        """
        # NOTE: only the filesystem driver implements this; an object store
        # would need a conditional copy and delete.
        raise NotImplementedError(f"{type(self).__name__} cannot claim objects")

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except PathNotFoundError:
            return False
        return True
