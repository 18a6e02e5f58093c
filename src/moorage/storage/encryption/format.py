"""The layout of an encrypted object, and the sealing of its segments.

An encrypted object is a 32-byte header followed by segments:

    header   "MRGENC01" (8) | object id (16, random) | segment size (4) | 0 (4)
    segment  nonce (12) | AES-256-GCM ciphertext (up to segment size) | tag (16)

Every segment but the last contains exactly `segment size` bytes of plaintext; the
last contains 1 to `segment size` bytes, or none for an empty object, so an object
always has at least one segment. Each segment's associated data is the header,
the segment index and a flag set on the last segment only: a segment moved to
another place, taken from another object, or a file cut short at a segment
boundary fails authentication instead of decrypting.

Nonces are random (96 bits) rather than counted, because an upload that resumes
in a later request seals its last segment again with more bytes in it; a counter
would then use one nonce twice under the same key. Every object has its own data
key, so the number of segments under one key stays far below the limit for
random nonces.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"MRGENC01"
HEADER_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SEGMENT_OVERHEAD = NONCE_BYTES + TAG_BYTES
DEFAULT_SEGMENT_BYTES = 64 * 1024
DATA_KEY_BYTES = 32
_HEADER = struct.Struct(">8s16sII")
_POSITION = struct.Struct(">QB")


def wrap_context(object_id: bytes) -> bytes:
    """Binds a wrapped data key to its object, so wraps cannot be swapped."""
    return b"moorage-data-key:" + object_id


class IntegrityError(Exception):
    """Stored ciphertext does not authenticate: altered, truncated or misplaced."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"integrity check failed for {path}: {reason}")
        self.path = path
        self.reason = reason


class MisplacedObjectError(IntegrityError):
    """An object was found at a path other than the one recorded for it.

    A whole encrypted file copied or moved over another object's path in the
    storage directory authenticates under its own data key, so the recorded
    path is what tells it apart from the object that belongs there.
    """


class DataKeyUnavailableError(IntegrityError):
    """No key this installation holds unwraps an object's data key.

    Raised for an object whose owners' keys were all destroyed (shredded), and
    for an object whose wraps and envelope are both missing.
    """


@dataclass(frozen=True, slots=True)
class Header:
    object_id: bytes
    segment_bytes: int

    @classmethod
    def new(cls, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> Header:
        return cls(os.urandom(16), segment_bytes)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(MAGIC, self.object_id, self.segment_bytes, 0)

    @property
    def sealed_segment_bytes(self) -> int:
        return self.segment_bytes + SEGMENT_OVERHEAD

    def segment_offset(self, index: int) -> int:
        """Offset of segment `index` in the stored object."""
        return HEADER_BYTES + index * self.sealed_segment_bytes

    def plaintext_size(self, stored_size: int) -> int:
        """Plaintext size of a stored object of `stored_size` bytes, or -1."""
        body = stored_size - HEADER_BYTES
        if body < SEGMENT_OVERHEAD:
            return -1
        segments = -(-body // self.sealed_segment_bytes)
        last = body - (segments - 1) * self.sealed_segment_bytes
        if last < SEGMENT_OVERHEAD:
            return -1
        return body - segments * SEGMENT_OVERHEAD


def parse_header(data: bytes) -> Header | None:
    """Return the header at the start of `data`, or None for a plaintext object."""
    if len(data) < HEADER_BYTES or not data.startswith(MAGIC):
        return None
    _, object_id, segment_bytes, _ = _HEADER.unpack_from(data)
    if segment_bytes == 0:
        return None
    return Header(object_id, segment_bytes)


class SegmentCipher:
    """Seals and opens the segments of one object under its data key."""

    def __init__(self, header: Header, data_key: bytes) -> None:
        self.header = header
        self._aead = AESGCM(data_key)
        self._prefix = header.to_bytes()

    def _associated_data(self, index: int, final: bool) -> bytes:
        return self._prefix + _POSITION.pack(index, 1 if final else 0)

    def seal(self, index: int, plaintext: bytes | memoryview, final: bool) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(
            nonce, plaintext, self._associated_data(index, final)
        )
        return nonce + sealed

    def open(
        self, path: str, index: int, sealed: bytes | memoryview, final: bool
    ) -> bytes:
        """Decrypt one segment; raise IntegrityError when it does not authenticate."""
        if len(sealed) < SEGMENT_OVERHEAD:
            raise IntegrityError(path, f"segment {index} is cut short")
        view = memoryview(sealed)
        try:
            return self._aead.decrypt(
                view[:NONCE_BYTES],
                view[NONCE_BYTES:],
                self._associated_data(index, final),
            )
        except InvalidTag:
            where = "last segment" if final else "segment"
            raise IntegrityError(
                path, f"{where} {index} does not authenticate"
            ) from None

    def open_into(
        self,
        path: str,
        index: int,
        sealed: bytes | memoryview,
        final: bool,
        out: memoryview,
    ) -> None:
        """Decrypt one segment into `out`, which has room for exactly its plaintext.

        Raise IntegrityError when it does not authenticate; `out` then contains
        bytes that must not be used.
        """
        if len(sealed) < SEGMENT_OVERHEAD:
            raise IntegrityError(path, f"segment {index} is cut short")
        view = memoryview(sealed)
        try:
            self._aead.decrypt_into(
                view[:NONCE_BYTES],
                view[NONCE_BYTES:],
                self._associated_data(index, final),
                out,
            )
        except InvalidTag:
            where = "last segment" if final else "segment"
            raise IntegrityError(
                path, f"{where} {index} does not authenticate"
            ) from None

    def open_run_into(
        self,
        path: str,
        first: int,
        sealed: memoryview,
        final: bool,
        out: memoryview,
    ) -> None:
        """Decrypt consecutive segments from `first` into `out`, in order.

        `sealed` contains whole sealed segments, the last of which may be shorter;
        `out` has room for exactly their plaintext. Only the last segment is
        opened as the final one, and only when `final` is set. Raise
        IntegrityError at the first segment that does not authenticate; `out`
        then contains bytes that must not be used.
        """
        size = self.header.sealed_segment_bytes
        plain = size - SEGMENT_OVERHEAD
        count = -(-len(sealed) // size)
        decrypt_into = self._aead.decrypt_into
        prefix = self._prefix
        pack = _POSITION.pack
        for step in range(count):
            start = step * size
            piece = sealed[start : start + size]
            index = first + step
            is_final = final and step == count - 1
            if len(piece) < SEGMENT_OVERHEAD:
                raise IntegrityError(path, f"segment {index} is cut short")
            try:
                decrypt_into(
                    piece[:NONCE_BYTES],
                    piece[NONCE_BYTES:],
                    prefix + pack(index, is_final),
                    out[step * plain : step * plain + len(piece) - SEGMENT_OVERHEAD],
                )
            except InvalidTag:
                where = "last segment" if is_final else "segment"
                raise IntegrityError(
                    path, f"{where} {index} does not authenticate"
                ) from None
