"""The encrypting driver layer over the filesystem driver."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import pytest

from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.encryption import driver as driver_module
from moorage.storage.encryption.driver import (
    LONE_READ_RUN_BYTES,
    READ_RUN_BYTES,
    EncryptedDriver,
    SegmentReader,
    envelope_path,
)
from moorage.storage.encryption.format import HEADER_BYTES, IntegrityError
from moorage.storage.encryption.keys import FileKeyring

SEGMENT = 1024
SEALED = SEGMENT + 28
MARKER = b"MOORAGE-PLAINTEXT-MARKER"


class StreamingFilesystemDriver(FilesystemDriver):
    """The filesystem driver without local files, as an object store would be:
    the encrypted layer then decrypts the chunks that `read` streams."""

    async def open_file(self, path: str) -> BinaryIO | None:
        return None


class Layer:
    """An encrypted driver over a directory, with the raw files at hand."""

    def __init__(
        self, root: Path, *, local_files: bool = True, threaded: bool = False
    ) -> None:
        self.root = root / "storage"
        # Read local files as the server sends them: with a `SegmentReader`
        # in worker threads.
        self.threaded = threaded
        inner = FilesystemDriver if local_files else StreamingFilesystemDriver
        self.plain = inner(self.root, fsync=False)
        self.keyring = FileKeyring(root / "keys")
        self.errors: list[IntegrityError] = []
        self.driver = EncryptedDriver(
            self.plain,
            self.keyring,
            segment_bytes=SEGMENT,
            on_integrity_error=self.errors.append,
        )

    def raw(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def write_raw(self, path: str, data: bytes) -> None:
        (self.root / path).write_bytes(data)

    async def store(self, path: str, data: bytes, pieces: int = 1) -> None:
        """Write `data` in `pieces` writers, as an upload spread over requests."""
        step = -(-len(data) // pieces) if data else 0
        offset = 0
        for index in range(pieces):
            writer = await self.driver.writer(path, offset)
            piece = data[index * step : (index + 1) * step]
            await writer.write(piece)
            offset = await writer.commit()
        assert offset == len(data)

    async def load(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> bytes:
        if self.threaded:
            reader = await self.driver.open_reader(path, offset, length)
            if reader is not None:
                return await read_threaded(reader)
        return b"".join(
            [chunk async for chunk in self.driver.read(path, offset, length)]
        )


@pytest.fixture(params=["local file", "streamed", "threaded reader"])
def layer(tmp_path: Path, request: pytest.FixtureRequest) -> Layer:
    """Every read path: runs read from a local file, chunks from a stream, or
    runs read from a local file in worker threads."""
    return Layer(
        tmp_path,
        local_files=request.param != "streamed",
        threaded=request.param == "threaded reader",
    )


async def read_threaded(
    reader: SegmentReader, received: bytearray | None = None
) -> bytes:
    """Read all of `reader` in worker threads, as the server does, and close it."""
    received = bytearray() if received is None else received
    try:
        while (chunk := await asyncio.to_thread(reader.read_chunk)) is not None:
            received += chunk
    finally:
        reader.close()
    return bytes(received)


async def read_into(
    chunks: AsyncIterator[bytes | memoryview], received: bytearray
) -> None:
    async for chunk in chunks:
        received += chunk


def sample(size: int) -> bytes:
    return ((MARKER + os.urandom(37)) * (size // 61 + 1))[:size]


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 5 * SEGMENT + 7]
)
async def test_round_trip_hides_plaintext(layer: Layer, size: int) -> None:
    """What is written reads back equal, and the stored file holds no plaintext."""
    data = sample(size)
    await layer.store("blobs/a", data)
    assert await layer.load("blobs/a") == data
    assert (await layer.driver.stat("blobs/a")).size == size
    assert MARKER not in layer.raw("blobs/a")


@pytest.mark.parametrize("pieces", [2, 3, 7])
async def test_writes_resumed_by_new_writers(layer: Layer, pieces: int) -> None:
    """An object appended by several writers, at unaligned offsets, reads back whole."""
    data = sample(4 * SEGMENT + 300)
    await layer.store("uploads/u/data", data, pieces)
    assert await layer.load("uploads/u/data") == data


async def test_resumed_write_at_segment_boundary(layer: Layer) -> None:
    """Resuming exactly at a segment boundary reseals the full last segment."""
    data = sample(3 * SEGMENT)
    writer = await layer.driver.writer("uploads/u/data", 0)
    await writer.write(data[: 2 * SEGMENT])
    await writer.commit()
    writer = await layer.driver.writer("uploads/u/data", 2 * SEGMENT)
    await writer.write(data[2 * SEGMENT :])
    assert await writer.commit() == len(data)
    assert await layer.load("uploads/u/data") == data


async def test_cancelled_resume_keeps_earlier_bytes(layer: Layer) -> None:
    """A resumed writer that is cancelled leaves the object as it was."""
    data = sample(SEGMENT + 500)
    await layer.store("uploads/u/data", data)
    writer = await layer.driver.writer("uploads/u/data", len(data))
    await writer.write(b"x" * 3000)
    await writer.cancel()
    assert await layer.load("uploads/u/data") == data


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, SEGMENT),
        (SEGMENT, SEGMENT),
        (SEGMENT - 1, 2),
        (SEGMENT + 1, 1),
        (2 * SEGMENT - 1, SEGMENT + 2),
        (3 * SEGMENT, 10),
        (10, None),
        (4 * SEGMENT, None),
    ],
)
async def test_range_reads_at_segment_boundaries(
    layer: Layer, offset: int, length: int | None
) -> None:
    """Range reads across and at segment edges return exactly the asked bytes."""
    data = sample(4 * SEGMENT + 17)
    await layer.store("blobs/r", data)
    end = None if length is None else offset + length
    assert await layer.load("blobs/r", offset, length) == data[offset:end]


async def test_flipped_byte_fails(layer: Layer) -> None:
    """A flipped ciphertext byte fails the read and reports an integrity error."""
    await layer.store("blobs/f", sample(3 * SEGMENT))
    raw = bytearray(layer.raw("blobs/f"))
    raw[HEADER_BYTES + SEALED + 100] ^= 0x01
    layer.write_raw("blobs/f", bytes(raw))
    with pytest.raises(IntegrityError, match="segment 1"):
        await layer.load("blobs/f")
    assert [error.path for error in layer.errors] == ["blobs/f"]


async def test_no_local_file_for_zero_copy(tmp_path: Path) -> None:
    """The layer offers no file to send as it is: its bytes are ciphertext."""
    layer = Layer(tmp_path)
    await layer.store("blobs/z", sample(10))
    stored = await layer.plain.open_file("blobs/z")
    assert stored is not None
    stored.close()
    assert await layer.driver.open_file("blobs/z") is None


async def test_failed_segment_yields_nothing_after(layer: Layer) -> None:
    """Chunks read before a failing segment are a prefix of the plaintext that
    stops before that segment: decrypted but unauthenticated bytes never leave."""
    data = sample(3 * 1024 * 1024)
    await layer.store("blobs/m", data)
    bad = 1500  # a segment in the second 1 MiB chunk the filesystem driver reads
    raw = bytearray(layer.raw("blobs/m"))
    raw[HEADER_BYTES + bad * SEALED + 100] ^= 0x01
    layer.write_raw("blobs/m", bytes(raw))
    received = bytearray()
    with pytest.raises(IntegrityError, match=f"segment {bad} "):
        await read_into(layer.driver.read("blobs/m"), received)
    assert received
    assert len(received) <= bad * SEGMENT
    assert bytes(received) == data[: len(received)]


@pytest.mark.parametrize("cut", [1, 28, SEALED])
async def test_truncated_file_fails(layer: Layer, cut: int) -> None:
    """A file cut short, even at a segment boundary, fails the read."""
    await layer.store("blobs/t", sample(3 * SEGMENT + 10))
    raw = layer.raw("blobs/t")
    layer.write_raw("blobs/t", raw[: len(raw) - 10 - 28 - cut + 1])
    with pytest.raises(IntegrityError):
        await layer.load("blobs/t")
    assert layer.errors


async def test_truncated_at_boundary_fails(layer: Layer) -> None:
    """Dropping the whole last segment is caught by the final-segment flag."""
    await layer.store("blobs/t", sample(3 * SEGMENT))
    raw = layer.raw("blobs/t")
    layer.write_raw("blobs/t", raw[:-SEALED])
    with pytest.raises(IntegrityError, match="last segment 1"):
        await layer.load("blobs/t")


async def test_swapped_segments_fail(layer: Layer) -> None:
    """Two segments exchanged in place fail authentication."""
    await layer.store("blobs/s", sample(3 * SEGMENT))
    raw = layer.raw("blobs/s")
    first = raw[HEADER_BYTES : HEADER_BYTES + SEALED]
    second = raw[HEADER_BYTES + SEALED : HEADER_BYTES + 2 * SEALED]
    layer.write_raw(
        "blobs/s",
        raw[:HEADER_BYTES] + second + first + raw[HEADER_BYTES + 2 * SEALED :],
    )
    with pytest.raises(IntegrityError, match="segment 0"):
        await layer.load("blobs/s")


async def test_segment_from_another_object_fails(layer: Layer) -> None:
    """A segment copied from another object (another data key) fails."""
    await layer.store("blobs/a", sample(2 * SEGMENT))
    await layer.store("blobs/b", sample(2 * SEGMENT))
    a, b = layer.raw("blobs/a"), layer.raw("blobs/b")
    layer.write_raw(
        "blobs/a",
        a[:HEADER_BYTES]
        + b[HEADER_BYTES : HEADER_BYTES + SEALED]
        + a[HEADER_BYTES + SEALED :],
    )
    with pytest.raises(IntegrityError):
        await layer.load("blobs/a")


async def test_missing_envelope_fails(layer: Layer) -> None:
    """Without its wrapped data key an object cannot be read."""
    await layer.store("blobs/k", sample(100))
    header = await layer.driver.read_header("blobs/k")
    assert header is not None
    await layer.plain.delete(envelope_path(header.object_id))
    with pytest.raises(IntegrityError, match="envelope is missing"):
        await layer.load("blobs/k")


async def test_plaintext_objects_read_as_stored(layer: Layer) -> None:
    """Objects written before encryption was on are read unchanged."""
    data = sample(5000)
    await layer.plain.put("blobs/old", data)
    assert await layer.load("blobs/old") == data
    assert await layer.load("blobs/old", 100, 50) == data[100:150]
    assert (await layer.driver.stat("blobs/old")).size == len(data)


async def test_move_and_delete_keep_envelopes_in_step(layer: Layer) -> None:
    """A moved object stays readable; deleting a prefix removes its envelopes."""
    data = sample(2000)
    await layer.store("uploads/x/data", data)
    await layer.driver.move("uploads/x/data", "blobs/x")
    assert await layer.load("blobs/x") == data
    await layer.driver.delete("blobs")
    assert await layer.plain.list(".keys") == []
    assert await layer.driver.list("") == []


async def test_chunks_stay_intact_while_later_ones_are_read(layer: Layer) -> None:
    """Chunks stay unchanged while later ones are read, whether the reader
    keeps every chunk or only the latest (the local path reuses free buffers)."""
    data = sample(5 * 1024 * 1024 + 100)
    await layer.store("blobs/l", data)
    kept = [chunk async for chunk in layer.driver.read("blobs/l")]
    assert len(kept) > 3
    assert b"".join(kept) == data
    received = bytearray()
    async for chunk in layer.driver.read("blobs/l", 7, len(data) - 7):
        received += chunk
    assert bytes(received) == data[7:]


async def test_concurrent_reads_interleaved(layer: Layer) -> None:
    """Two reads of one object, advanced in turn, each return the whole object
    (a lone local read decrypts ahead in a thread, concurrent ones inline)."""
    data = sample(4 * 1024 * 1024 + 3)
    await layer.store("blobs/i", data)
    first, second = layer.driver.read("blobs/i"), layer.driver.read("blobs/i")
    received = [bytearray(), bytearray()]
    pending = [first, second]
    while pending:
        for stream in list(pending):
            try:
                received[0 if stream is first else 1] += await anext(stream)
            except StopAsyncIteration:
                pending.remove(stream)
    assert received == [data, data]


async def test_reads_a_file_not_in_the_page_cache(tmp_path: Path) -> None:
    """A file whose pages were evicted is read in a worker thread, correctly."""
    layer = Layer(tmp_path)
    data = sample(3 * 1024 * 1024)
    await layer.store("blobs/c", data)
    fd = os.open(layer.root / "blobs/c", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        probe = bytearray(4096)
        try:
            os.preadv(fd, [probe], 2 * 1024 * 1024, os.RWF_NOWAIT)
        except BlockingIOError:
            pass
        else:
            pytest.skip("the kernel kept the file's pages cached")
    finally:
        os.close(fd)
    assert await layer.load("blobs/c") == data
    assert await layer.load("blobs/c", 1000, 5000) == data[1000:6000]


def _memory_filesystem() -> Path | None:
    """Return a writable tmpfs mount, whose files reject RWF_NOWAIT reads."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return None


@pytest.mark.skipif(_memory_filesystem() is None, reason="no writable /dev/shm")
async def test_reads_on_tmpfs_without_nowait(tmp_path: Path) -> None:
    """On a filesystem that rejects RWF_NOWAIT, each run is read in a thread."""
    shm = _memory_filesystem()
    assert shm is not None
    directory = Path(tempfile.mkdtemp(dir=shm, prefix="moorage-test-"))
    try:
        layer = Layer(directory)
        data = sample(3 * 1024 * 1024)
        await layer.store("blobs/d", data)
        assert await layer.load("blobs/d") == data
        assert await layer.load("blobs/d", 1000, 5000) == data[1000:6000]
        assert layer.errors == []
    finally:
        shutil.rmtree(directory)


async def test_threaded_reader_stops_before_a_failing_run(tmp_path: Path) -> None:
    """A lone threaded read decrypts the next run ahead. A segment that fails in
    a later run stops the read before any of that run's bytes, is reported on
    the event loop, and the file is closed."""
    layer = Layer(tmp_path)
    data = sample(3 * LONE_READ_RUN_BYTES + 5)
    await layer.store("blobs/m", data)
    bad = 2 * LONE_READ_RUN_BYTES // SEGMENT + 52  # a segment of the third run
    raw = bytearray(layer.raw("blobs/m"))
    raw[HEADER_BYTES + bad * SEALED + 100] ^= 0x01
    layer.write_raw("blobs/m", bytes(raw))
    reader = await layer.driver.open_reader("blobs/m")
    assert reader is not None
    received = bytearray()
    with pytest.raises(IntegrityError, match=f"segment {bad} "):
        await read_threaded(reader, received)
    assert bytes(received) == data[: 2 * LONE_READ_RUN_BYTES]
    assert [error.path for error in layer.errors] == ["blobs/m"]
    assert reader._file.closed
    assert layer.driver._local_reads == 0


async def test_threaded_reader_run_sizes(tmp_path: Path) -> None:
    """A reader opened alone reads larger runs than one opened beside another,
    and both read every byte."""
    layer = Layer(tmp_path)
    data = sample(2 * LONE_READ_RUN_BYTES + 7)
    await layer.store("blobs/r", data)
    lone = await layer.driver.open_reader("blobs/r")
    assert lone is not None
    first = await asyncio.to_thread(lone.read_chunk)
    assert first is not None
    assert len(first) == LONE_READ_RUN_BYTES
    beside = await layer.driver.open_reader("blobs/r", 3)
    assert beside is not None
    second = await asyncio.to_thread(beside.read_chunk)
    assert second is not None
    assert len(second) == READ_RUN_BYTES - 3
    received = bytearray(first)
    assert await read_threaded(lone, received) == data
    received = bytearray(second)
    assert await read_threaded(beside, received) == data[3:]
    assert layer.errors == []


def shared_runs(layer: Layer) -> dict[int, bytearray]:
    """The runs that the open readers of the driver's only shared file keep."""
    (shared,) = layer.driver._shared_runs.values()
    return dict(shared._runs)


async def test_concurrent_readers_share_decrypted_runs(tmp_path: Path) -> None:
    """Readers of one file open at the same time decrypt each whole run once.
    A run that one reader authenticated is sent to the next from memory, even
    after the file was altered. The runs go when the last reader closes."""
    layer = Layer(tmp_path)
    data = sample(3 * READ_RUN_BYTES + 5)
    await layer.store("blobs/s", data)
    first = await layer.driver.open_reader("blobs/s")
    second = await layer.driver.open_reader("blobs/s")
    assert first is not None
    assert second is not None
    chunk = await asyncio.to_thread(first.read_chunk)
    assert chunk is not None
    assert bytes(chunk) == data[:READ_RUN_BYTES]
    assert list(shared_runs(layer)) == [0]
    # Alter a segment of the first run, which `first` decrypted already.
    raw = bytearray(layer.raw("blobs/s"))
    raw[HEADER_BYTES + 3 * SEALED + 100] ^= 0x01
    layer.write_raw("blobs/s", bytes(raw))
    again = await asyncio.to_thread(second.read_chunk)
    assert again is not None
    assert bytes(again) == data[:READ_RUN_BYTES]
    received = bytearray(chunk)
    assert await read_threaded(first, received) == data
    received = bytearray(again)
    assert await read_threaded(second, received) == data
    assert layer.errors == []
    assert layer.driver._shared_runs == {}
    # A reader alone decrypts the run itself, and finds the change.
    alone = await layer.driver.open_reader("blobs/s")
    assert alone is not None
    with pytest.raises(IntegrityError, match="segment 3 "):
        await read_threaded(alone)
    assert [error.path for error in layer.errors] == ["blobs/s"]


async def test_shared_runs_fail_for_every_reader(tmp_path: Path) -> None:
    """A run that does not authenticate is not kept: each concurrent reader
    that comes to it decrypts it, fails, and is reported, with the bytes
    before it sent."""
    layer = Layer(tmp_path)
    data = sample(3 * READ_RUN_BYTES)
    await layer.store("blobs/f", data)
    bad = READ_RUN_BYTES // SEGMENT + 7  # a segment of the second run
    raw = bytearray(layer.raw("blobs/f"))
    raw[HEADER_BYTES + bad * SEALED + 50] ^= 0x01
    layer.write_raw("blobs/f", bytes(raw))
    readers = [await layer.driver.open_reader("blobs/f") for _ in range(2)]
    for reader in readers:
        assert reader is not None
        received = bytearray()
        with pytest.raises(IntegrityError, match=f"segment {bad} "):
            await read_threaded(reader, received)
        assert bytes(received) == data[:READ_RUN_BYTES]
    assert [error.path for error in layer.errors] == ["blobs/f", "blobs/f"]
    assert layer.driver._shared_runs == {}


async def test_shared_runs_stay_within_each_range(tmp_path: Path) -> None:
    """Beside another reader, a range read keeps and reuses only runs that lie
    whole within its range: it decrypts no segment outside the range, so a
    damaged segment just past it does not fail it."""
    layer = Layer(tmp_path)
    data = sample(4 * READ_RUN_BYTES)
    await layer.store("blobs/g", data)
    per_run = READ_RUN_BYTES // SEGMENT
    past = 2 * per_run + 5  # a segment of the third run, past the range
    raw = bytearray(layer.raw("blobs/g"))
    raw[HEADER_BYTES + past * SEALED + 50] ^= 0x01
    layer.write_raw("blobs/g", bytes(raw))
    other = await layer.driver.open_reader("blobs/g", 0, SEGMENT)
    assert other is not None
    offset = SEGMENT + 10  # within the first run
    length = 2 * per_run * SEGMENT + 3 * SEGMENT  # ends before segment `past`
    ranged = await layer.driver.open_reader("blobs/g", offset, length)
    assert ranged is not None
    chunk = await asyncio.to_thread(ranged.read_chunk)
    assert chunk is not None
    # Up to the start of the second run, decrypted for this reader alone.
    assert bytes(chunk) == data[offset:READ_RUN_BYTES]
    assert shared_runs(layer) == {}
    received = bytearray(chunk)
    await read_rest(ranged, received)
    ranged.close()
    assert bytes(received) == data[offset : offset + length]
    # Only the second run lay whole in the range.
    assert list(shared_runs(layer)) == [per_run]
    assert await read_threaded(other) == data[:SEGMENT]
    assert layer.errors == []


async def test_threaded_reader_closed_while_reading_ahead(tmp_path: Path) -> None:
    """Closing a reader whose next run is still being read closes its file once
    that thread is done, and a read after closing fails."""
    layer = Layer(tmp_path)
    await layer.store("blobs/c", sample(4 * 1024 * 1024))
    reader = await layer.driver.open_reader("blobs/c", 10, 3 * 1024 * 1024)
    assert reader is not None
    assert await asyncio.to_thread(reader.read_chunk) is not None
    reader.close()
    for _ in range(100):
        if reader._file.closed:
            break
        await asyncio.sleep(0.01)
    assert reader._file.closed
    with pytest.raises(ValueError, match="closed"):
        reader.read_chunk()


async def test_threaded_reader_decrypts_from_a_map(tmp_path: Path) -> None:
    """A threaded read of a local file of 4 MiB or more decrypts from a memory
    map under a read lease, reads ranges at segment boundaries right, and
    releases the map. A smaller file is read without a map."""
    layer = Layer(tmp_path)
    data = sample(5 * 1024 * 1024 + 5)
    await layer.store("blobs/p", data)
    await layer.store("blobs/small", data[: 3 * 1024 * 1024])
    small = await layer.driver.open_reader("blobs/small", 0, None)
    assert small is not None
    assert small._runs._mapped is None
    assert await read_threaded(small) == data[: 3 * 1024 * 1024]
    cases = [(0, None), (SEGMENT, SEGMENT), (SEGMENT - 1, 2), (2 * 1024 * 1024, None)]
    for offset, length in cases:
        reader = await layer.driver.open_reader("blobs/p", offset, length)
        assert reader is not None
        assert reader._runs._mapped is not None
        received = await read_threaded(reader)
        end = None if length is None else offset + length
        assert received == data[offset:end]
        assert reader._runs._mapped is None
        if length is None:
            assert reader._runs._dropped > 0
    assert layer.errors == []


async def read_rest(reader: SegmentReader, received: bytearray) -> None:
    """Add the rest of `reader`'s runs to `received`, one thread trip each."""
    while (chunk := await asyncio.to_thread(reader.read_chunk)) is not None:
        received += chunk


async def test_truncation_goes_ahead_of_a_mapped_reader(tmp_path: Path) -> None:
    """A mapped reader holds its read lease only while it decrypts a run, so a
    truncation between runs goes ahead at once, as when a client stops reading.
    The rest of the read fails as cut short, never with wrong bytes."""
    layer = Layer(tmp_path)
    # Three runs: the first is read, the second read ahead, the third cut.
    data = sample(3 * LONE_READ_RUN_BYTES)
    await layer.store("blobs/t", data)
    path = layer.root / "blobs/t"
    reader = await layer.driver.open_reader("blobs/t")
    assert reader is not None
    assert reader._runs._mapped is not None
    received = bytearray()
    first = await asyncio.to_thread(reader.read_chunk)
    assert first is not None
    received += first
    if reader._ahead is not None:
        await asyncio.wrap_future(reader._ahead)
    fd = reader._file.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
    started = time.monotonic()
    await asyncio.to_thread(os.truncate, path, HEADER_BYTES + 100 * SEALED)
    assert time.monotonic() - started < 5
    with pytest.raises(IntegrityError, match="cut short"):
        await read_rest(reader, received)
    reader.close()
    assert reader._runs._mapped is None
    assert len(received) >= 1024 * 1024
    assert bytes(received) == data[: len(received)]
    assert [error.path for error in layer.errors] == ["blobs/t"]


async def test_reader_ahead_lets_readers_behind_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader about to decrypt a run that is not kept, while another reader
    of the file is behind it and read lately, returns an empty piece once for
    that run, then the run. `read_first` skips that piece, and a reader alone
    never returns one."""
    # Every reader counts as active, however slow this machine is.
    monkeypatch.setattr(driver_module, "_ACTIVE_SECONDS", 3600.0)
    layer = Layer(tmp_path)
    data = sample(4 * READ_RUN_BYTES)
    await layer.store("blobs/y", data)
    behind = await layer.driver.open_reader("blobs/y")
    ahead = await layer.driver.open_reader("blobs/y")
    assert behind is not None
    assert ahead is not None
    chunk = await asyncio.to_thread(behind.read_chunk)
    assert chunk is not None
    assert len(chunk) == READ_RUN_BYTES
    sizes = []
    for _ in range(4):
        chunk = await asyncio.to_thread(ahead.read_chunk)
        assert chunk is not None
        sizes.append(len(chunk))
    # Run 0 was kept, run 1 starts where `behind` is, and run 2 is ahead of it.
    assert sizes == [READ_RUN_BYTES, READ_RUN_BYTES, 0, READ_RUN_BYTES]
    later = await layer.driver.open_reader("blobs/y", 3 * READ_RUN_BYTES)
    assert later is not None
    await later.read_first()
    chunk = await asyncio.to_thread(later.read_chunk)
    assert chunk is not None
    assert bytes(chunk) == data[3 * READ_RUN_BYTES :]
    later.close()
    received = bytearray(data[: 3 * READ_RUN_BYTES])
    assert await read_threaded(ahead, received) == data
    received = bytearray(data[:READ_RUN_BYTES])
    assert await read_threaded(behind, received) == data
    assert layer.errors == []
    alone = await layer.driver.open_reader("blobs/y")
    assert alone is not None
    pieces: list[bytes] = []
    while (chunk := await asyncio.to_thread(alone.read_chunk)) is not None:
        pieces.append(bytes(chunk))
    alone.close()
    assert all(pieces)
    assert b"".join(pieces) == data
