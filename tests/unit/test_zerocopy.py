"""Zero-copy file bodies through uvicorn's protocol with the extension added."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from moorage import zerocopy
from moorage.zerocopy import (
    SEND_BUFFER_BYTES,
    ThreadedBodyResponse,
    ZeroCopyFileResponse,
    ZeroCopyProtocol,
    _read_cached,
    _write_body,
    send_buffer_bytes,
    size_body_threads,
    supports_zerocopy,
)

SIZE = 24 * 1024 * 1024 + 11


class FileBody:
    """A threaded body: `count` bytes of the file from `offset` (fewer when the
    file ends first) in pieces of up to 1 MiB, read into
    one reused buffer, so a piece used after the next call would show as wrong
    bytes. Raises after `fail_at` bytes of the file, when given."""

    def __init__(
        self,
        path: Path,
        offset: int,
        count: int,
        fail_at: int | None,
        *,
        empty_pieces: bool = False,
    ) -> None:
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115
        self.position = offset
        self.end = offset + count
        self.fail_at = fail_at
        self.buffer = bytearray(1024 * 1024)
        self.closed = False
        # Return an empty piece before every piece, as a `SegmentReader`
        # does when it lets other bodies go first.
        self.empty_pieces = empty_pieces
        self.empty_next = empty_pieces

    def read_chunk(self) -> memoryview | None:
        if self.fail_at is not None and self.position >= self.fail_at:
            raise ValueError("this piece does not authenticate")
        if self.empty_next:
            self.empty_next = False
            return memoryview(b"")
        self.empty_next = self.empty_pieces
        piece = memoryview(self.buffer)[: self.end - self.position]
        read = os.preadv(self.file.fileno(), [piece], self.position)
        if not read:
            return None
        self.position += read
        return memoryview(self.buffer)[:read]

    def close(self) -> None:
        self.closed = True
        self.file.close()


class FileApp:
    """Serves `path`: the whole file, a range from `?offset=..&count=..`, and
    records whether each request's scope offered the extension. With
    `?threaded=1` the file goes out as a `FileBody` (`fail=N` makes it raise)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offered: list[bool] = []
        self.bodies: list[FileBody] = []
        self.files: list[Any] = []
        self.server: uvicorn.Server | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.offered.append(supports_zerocopy(scope))
        query = dict(
            part.split("=")
            for part in scope["query_string"].decode().split("&")
            if part
        )
        offset = int(query.get("offset", 0))
        count = int(query.get("count", self.path.stat().st_size - offset))
        announced = int(query.get("announce", count))
        if "threaded" in query:
            fail = int(query["fail"]) if "fail" in query else None
            body = FileBody(
                self.path, offset, announced, fail, empty_pieces="empty" in query
            )
            self.bodies.append(body)
            await ThreadedBodyResponse(
                body,
                announced,
                status_code=200,
                headers={"Content-Length": str(announced)},
                media_type="application/octet-stream",
            )(scope, receive, send)
            return
        file = open(self.path, "rb", buffering=0)  # noqa: ASYNC230, SIM115
        self.files.append(file)
        response = ZeroCopyFileResponse(
            file,
            offset,
            count,
            status_code=200,
            headers={"Content-Length": str(announced)},
            media_type="application/octet-stream",
        )
        await response(scope, receive, send)


@pytest.fixture
def one_body_thread() -> Iterator[None]:
    """Leave one body thread, as a process gets when there are as many processes
    as cores; restore one thread per core afterwards."""
    size_body_threads(os.cpu_count() or 2)
    try:
        yield
    finally:
        size_body_threads(1)


@pytest.fixture
def content() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def data_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(content)
    return path


@pytest.fixture
async def server(data_file: Path) -> AsyncIterator[tuple[FileApp, int]]:
    app = FileApp(data_file)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=ZeroCopyProtocol, log_config=None, lifespan="off", access_log=False
    )
    instance = uvicorn.Server(config)
    app.server = instance
    task = asyncio.create_task(instance.serve(sockets=[listener]))
    # uvicorn.Server offers only a `started` flag to wait for.
    while not instance.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        yield app, listener.getsockname()[1]
    finally:
        instance.should_exit = True
        # uvicorn waits for running responses, so one that never ends would
        # hang the test instead of failing it.
        await asyncio.wait_for(task, timeout=30)


async def get(port: int, target: str, *, pause: float = 0) -> tuple[bytes, bytes]:
    """Send a GET; return the response head and as much body as arrives before
    the server closes or Content-Length is reached. `pause` slows the reader so
    that the server finds the socket full."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024
    )
    writer.write(f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    body = bytearray()
    while len(body) < length:
        chunk = await reader.read(256 * 1024)
        if not chunk:
            break
        body += chunk
        if pause:
            await asyncio.sleep(pause)
    writer.close()
    return head, bytes(body)


async def test_whole_file_sent(server: Any, content: bytes) -> None:
    """A plain-HTTP scope offers the extension and the body equals the file."""
    app, port = server
    head, body = await get(port, "/")
    assert head.startswith(b"HTTP/1.1 200")
    assert app.offered == [True]
    assert body == content


async def test_slow_reader_gets_every_byte(server: Any, content: bytes) -> None:
    """A reader slower than the server fills the socket; nothing is lost or
    reordered while the server waits for room."""
    _, port = server
    _, body = await get(port, "/", pause=0.002)
    assert len(body) == SIZE
    assert body == content


@pytest.mark.parametrize(("offset", "count"), [(0, 1), (5, 0), (1000, 3 * 1024 * 1024)])
async def test_range_sent(server: Any, content: bytes, offset: int, count: int) -> None:
    """`offset` and `count` select the bytes sent."""
    _, port = server
    _, body = await get(port, f"/?offset={offset}&count={count}")
    assert body == content[offset : offset + count]


async def test_short_file_closes_connection(server: Any, content: bytes) -> None:
    """A file that ends before the announced length closes the connection
    instead of leaving the client waiting."""
    _, port = server
    offset = SIZE - 100
    target = f"/?offset={offset}&count=200&announce=200"
    _, body = await asyncio.wait_for(get(port, target), timeout=10)
    assert body == content[offset:]


async def test_client_leaving_mid_body_ends_response(server: Any) -> None:
    """A client that stops reading and closes its socket while the server waits
    for room in the socket ends the response: the file is closed."""
    app, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1024 * 1024)
    # Give the server time to fill the socket and start waiting for room.
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(500):
        if app.files and app.files[0].closed:
            break
        await asyncio.sleep(0.01)
    assert app.files[0].closed


def send_buffers(app: FileApp) -> list[int]:
    """Return SO_SNDBUF of each of the server's open connections."""
    assert app.server is not None
    return [
        protocol.transport.get_extra_info("socket").getsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF
        )
        for protocol in app.server.server_state.connections
    ]


def locked_send_buffer() -> int:
    """Return the SO_SNDBUF that Linux reports after SEND_BUFFER_BYTES is set."""
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    return 2 * min(SEND_BUFFER_BYTES, wmem_max)


async def test_large_file_enlarges_send_buffer(server: Any, content: bytes) -> None:
    """A file body larger than SEND_BUFFER_BYTES sets the connection's send
    buffer to what `send_buffer_bytes` gives; a smaller one leaves it."""
    if not zerocopy._send_buffer_bytes:
        pytest.skip("this kernel's own tuning reaches a larger send buffer")
    app, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    small = SEND_BUFFER_BYTES
    for target, length in ((f"/?count={small}", small), ("/", SIZE)):
        writer.write(f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(length) == content[:length]
        if length == small:
            before = send_buffers(app)
    after = send_buffers(app)
    writer.close()
    locked = locked_send_buffer()
    assert before != [locked]
    assert after == [locked]


@pytest.mark.parametrize(
    ("wmem_max", "tcp_wmem", "expected"),
    [
        ("4194304", "4096 16384 4194304", SEND_BUFFER_BYTES),
        ("4194304", "4096 16384 16777216", 0),
        ("1048576", "4096 16384 4194304", 0),
        ("212992", "4096 16384", 0),
        (None, "4096 16384 4194304", 0),
    ],
)
def test_send_buffer_only_above_the_kernels_tuning(
    tmp_path: Path, wmem_max: str | None, tcp_wmem: str, expected: int
) -> None:
    """The buffer is set only when the locked size would exceed the largest
    that the kernel's tuning reaches, and never when the limits are unknown."""
    cap = tmp_path / "wmem_max"
    if wmem_max is not None:
        cap.write_text(wmem_max + "\n")
    tuned = tmp_path / "tcp_wmem"
    tuned.write_text(tcp_wmem + "\n")
    assert send_buffer_bytes(cap, tuned) == expected


def test_read_cached_reads_only_cached_pages(data_file: Path, content: bytes) -> None:
    """The fallback piece is read on the event loop only from the page cache:
    evicted pages raise BlockingIOError, so the read goes to a thread."""
    file = os.open(data_file, os.O_RDONLY)
    try:
        assert _read_cached(file, 1000, 5) == content[5:1005]
        assert _read_cached(file, 1000, SIZE - 10) == content[-10:]
        os.fsync(file)
        os.posix_fadvise(file, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(BlockingIOError):
            _read_cached(file, 1000, 1024 * 1024)
    finally:
        os.close(file)


async def test_keep_alive_after_zerocopy(server: Any, content: bytes) -> None:
    """A second request on the same connection gets its own complete response."""
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    expected = content[:1000]
    for _ in range(2):
        writer.write(b"GET /?count=1000 HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(1000) == expected
    writer.close()


async def test_threaded_body_sent_whole_and_slowly(server: Any, content: bytes) -> None:
    """A threaded body arrives intact to a fast and to a slow reader, whose full
    socket sends pieces through the transport; the body is closed."""
    app, port = server
    _, body = await get(port, "/?threaded=1")
    assert body == content
    _, body = await get(port, "/?threaded=1", pause=0.002)
    assert body == content
    assert [body.closed for body in app.bodies] == [True, True]


async def test_threaded_body_empty_pieces(server: Any, content: bytes) -> None:
    """Empty pieces, which end a thread's trip, lose and add nothing."""
    app, port = server
    _, body = await get(port, "/?threaded=1&empty=1")
    assert body == content
    _, body = await get(port, "/?threaded=1&empty=1", pause=0.002)
    assert body == content
    assert [body.closed for body in app.bodies] == [True, True]


class Pieces:
    """A threaded body that returns the given pieces, then None."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def read_chunk(self) -> memoryview | None:
        return memoryview(self.pieces.pop(0)) if self.pieces else None

    def close(self) -> None:
        pass


def test_empty_piece_ends_trip() -> None:
    """`_write_body` returns at an empty piece, and the next trip goes on."""
    sender, receiver = socket.socketpair()
    try:
        sender.setblocking(False)
        body = Pieces(b"abc", b"", b"defg")
        assert _write_body(sender.fileno(), body, memoryview(b""), 7) == (
            3,
            memoryview(b""),
            False,
        )
        written, pending, ended = _write_body(sender.fileno(), body, memoryview(b""), 4)
        assert (written, bytes(pending), ended) == (4, b"", False)
        assert receiver.recv(16) == b"abcdefg"
    finally:
        sender.close()
        receiver.close()


async def test_threaded_body_range(server: Any, content: bytes) -> None:
    offset, count = 1000, 3 * 1024 * 1024 + 7
    _, body = await get(
        port=server[1], target=f"/?threaded=1&offset={offset}&count={count}"
    )
    assert body == content[offset : offset + count]


async def test_threaded_body_short_or_failing_closes_connection(
    server: Any, content: bytes
) -> None:
    """A body that ends early, or whose `read_chunk` raises, closes the
    connection after the bytes before it, instead of leaving the client waiting."""
    app, port = server
    offset = SIZE - 100
    target = f"/?threaded=1&offset={offset}&announce=200"
    _, body = await asyncio.wait_for(get(port, target), timeout=10)
    assert body == content[offset:]
    fail_at = 5 * 1024 * 1024
    target = f"/?threaded=1&fail={fail_at}"
    _, body = await asyncio.wait_for(get(port, target), timeout=10)
    assert body == content[:fail_at]
    assert all(body.closed for body in app.bodies)


@pytest.mark.usefixtures("one_body_thread")
async def test_threaded_bodies_share_one_thread(server: Any, content: bytes) -> None:
    """Three slow readers served by one body thread each get the whole body: a
    full socket ends its trip, so the thread turns to the others."""
    _, port = server
    results = await asyncio.wait_for(
        asyncio.gather(*(get(port, "/?threaded=1", pause=0.002) for _ in range(3))),
        timeout=60,
    )
    for _, body in results:
        assert len(body) == SIZE
        assert body == content


async def test_finished_requests_are_freed_without_the_garbage_collector(
    server: Any,
) -> None:
    """A finished request's cycle is freed by reference counting: the receive
    and send wrappers do not form reference cycles with it."""
    _, port = server
    gc.collect()
    gc.disable()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(12):
            writer.write(b"GET /?count=10 HTTP/1.1\r\nHost: test\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(10)
        # The task that ran the last request ends after sending its response.
        await asyncio.sleep(0.1)
        # type(), because isinstance also matches weak proxies to a cycle.
        cycles = [o for o in gc.get_objects() if type(o) is RequestResponseCycle]
        writer.close()
    finally:
        gc.enable()
    # The connection's protocol still holds its latest request.
    assert len(cycles) <= 1
