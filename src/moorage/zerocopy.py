"""Zero-copy blob bodies: the ASGI `http.response.zerocopy` extension on uvicorn.

uvicorn (0.55) copies every response body through Python: a blob chunk is read
from the file into a bytes object and written to the socket from there.
`ZeroCopyProtocol` is uvicorn's httptools protocol with the ASGI zero-copy send
extension added for plain-HTTP connections: the application sends
`{"type": "http.response.zerocopy", "file": ..., "offset": ..., "count": ...}`
and the protocol hands the file's pages to the socket with `os.sendfile`.

The protocol writes to the socket's descriptor itself, so it first waits until
the transport has nothing buffered (the response head was sent), and nothing
else writes to a connection while its response is sent. When the socket is
full, one piece of the file goes through the transport the usual way, and the
transport's flow control reports when that piece, and so everything before it,
has been sent. For a file larger than `SEND_BUFFER_BYTES` the protocol enlarges
the socket's send buffer, so that the process is woken less often and the
client has more to read while the process waits for the CPU. Connections with
TLS never get the extension: their bytes must pass through the TLS layer.

The protocol also receives request bodies with fewer copies than uvicorn's:
uvicorn appends each piece of a body to a bytearray and copies that into a
new bytes object for the application, and pauses reading the socket whenever
64 KiB wait, which with 256 KiB reads is at every read. Here the pieces that
the parser hands over are queued and given to the application as they are,
one per `http.request` message, and reading pauses only when
`BODY_HIGH_WATER` bytes wait. This holds on every connection, TLS or not.

The same message may carry a `"body"` instead of a `"file"`: an object whose
blocking `read_chunk` returns the next piece of the body (see `ThreadedBody`).
Pieces are then produced and written to the socket in a worker thread, so that
work which releases the GIL (reading and decrypting an encrypted file) and the
socket writes stay off the event loop, and cost no hand-off per piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socket import SO_SNDBUF, SOL_SOCKET
from typing import Any, BinaryIO, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from moorage.httplimits import LimitedHttpToolsProtocol
from moorage.logs import connection_logger

ZEROCOPY = "http.response.zerocopy"
# Reads that fail rather than wait for the disk (Linux only).
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
# Bytes per sendfile call at most. The socket takes what fits, so a larger
# value only saves system calls.
SENDFILE_BYTES = 4 * 1024 * 1024
# SO_SNDBUF asked for a connection that sends a file body larger than this.
# Linux caps the value at net.core.wmem_max and doubles it, and stops tuning
# the buffer itself. With a larger buffer the process wakes less often per GiB,
# and more data waits in the kernel for the client while the process waits
# for the CPU (see `send_buffer_bytes`).
SEND_BUFFER_BYTES = 4 * 1024 * 1024
# Bytes of the file written through the transport when the socket is full. The
# transport reports when it has sent them, which is when the socket has room.
FALLBACK_BYTES = 64 * 1024
# Bytes of a threaded body written per trip to a worker thread at most, so that
# the event loop checks for a lost client now and then.
THREAD_TRIP_BYTES = 16 * 1024 * 1024
# Threads that write threaded bodies, apart from the default executor, so that
# slow pulls cannot hold up other work sent to threads. `size_body_threads`
# sets how many. Until then, one per core.
_body_threads = ThreadPoolExecutor(
    max_workers=os.cpu_count() or 2, thread_name_prefix="moorage-body"
)

# Request body bytes queued per request before the protocol stops reading
# the socket, until the application takes some.
BODY_HIGH_WATER = 1024 * 1024

SendMessage = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ThreadedBody(Protocol):
    """A response body produced by blocking calls in a worker thread."""

    def read_chunk(self) -> memoryview | None:
        """Return the next piece of the body, or None after the last one.

        Called in a worker thread, one call at a time. The piece stays valid
        until the next call. An empty piece ends the thread's trip, so that
        bodies queued behind this one are written first.
        """

    def close(self) -> None:
        """Release the body; called on the event loop once no thread reads it."""


class ZeroCopyProtocol(LimitedHttpToolsProtocol):
    """uvicorn's httptools protocol with the zero-copy send extension on plain HTTP.

    NOTE: this hooks `_start_asgi_task`, a private method of uvicorn's protocol
    (present in 0.55). With a uvicorn without it, scopes lack the extension and
    blobs are streamed through Python as before.
    """

    _zerocopy = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.logger = connection_logger(self.logger, self.client)
        has_socket = transport.get_extra_info("socket") is not None
        self._zerocopy = self.scheme == "http" and has_socket

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (
            self.parser.should_upgrade() and self._should_upgrade()
        ) or cycle.response_complete:
            return
        queue = _body_queue(cycle)
        queue.append(body)
        queue.size += len(body)
        if queue.size > BODY_HIGH_WATER:
            self.flow.pause_reading()
        cycle.message_event.set()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.receive = _BodyReceiver(cycle).receive  # type: ignore[method-assign,assignment]
        if self._zerocopy:
            extensions = cycle.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
            extensions[ZEROCOPY] = {}
            sender = _ZeroCopySender(cycle, cycle.send)  # type: ignore[arg-type]
            cycle.send = sender.send  # type: ignore[method-assign,assignment]
        super()._start_asgi_task(cycle, app)


class _BodyQueue(deque[bytes]):
    """The body pieces of one request not yet given to the application."""

    size = 0


def _body_queue(cycle: RequestResponseCycle) -> _BodyQueue:
    queue: _BodyQueue | None = getattr(cycle, "moorage_body", None)
    if queue is None:
        queue = _BodyQueue()
        cycle.moorage_body = queue  # type: ignore[attr-defined]
    return queue


class _BodyReceiver:
    """One request's ASGI `receive`, which gives the queued body pieces one by
    one; otherwise what uvicorn's `RequestResponseCycle.receive` does."""

    def __init__(self, cycle: RequestResponseCycle) -> None:
        # A weak reference, because the cycle holds this object's `receive`: a
        # strong one made every request garbage that only the cyclic garbage
        # collector frees, which under load kept about 3 MiB more per worker
        # (330 requests' objects awaiting collection after a manifest GET run).
        # The running request's task holds the cycle while `receive` is used.
        self._cycle = weakref.proxy(cycle)
        self._queue = _body_queue(cycle)
        self._finished = False

    async def receive(self) -> dict[str, Any]:
        cycle = self._cycle
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        queue = self._queue
        while not cycle.disconnected and not cycle.response_complete:
            if queue:
                body = queue.popleft()
                queue.size -= len(body)
                more_body = bool(queue) or cycle.more_body
                self._finished = not more_body
                if queue.size <= BODY_HIGH_WATER:
                    cycle.flow.resume_reading()
                return {"type": "http.request", "body": body, "more_body": more_body}
            if not cycle.more_body and not self._finished:
                self._finished = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # Wait for more of the body, or, after all of it, for the
            # response to complete or the client to leave.
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        return {"type": "http.disconnect"}


class _ZeroCopySender:
    """One response's ASGI `send`, which also takes zero-copy messages."""

    def __init__(self, cycle: RequestResponseCycle, send: SendMessage) -> None:
        # Weak references, because the cycle holds this object's `send` (see
        # _BodyReceiver).
        self._cycle = weakref.proxy(cycle)
        self._uvicorn_send = weakref.WeakMethod(send)

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        send = self._uvicorn_send()
        if send is None:
            raise RuntimeError("ASGI send called after its request ended")
        await send(message)

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] != ZEROCOPY:
            await self._send(message)
            return
        cycle = self._cycle
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError(f"ASGI message {ZEROCOPY!r} outside a response body")
        count = message["count"]
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        sent = 0
        if not cycle.disconnected:
            if "body" in message:
                sent = await _send_body(cycle, message["body"], count)
            else:
                sent = await _send_file(
                    cycle, message["file"].fileno(), message.get("offset", 0), count
                )
            cycle.expected_content_length -= sent
        # For the request log and metrics (see moorage.api.middleware).
        message["sent"] = sent
        # uvicorn's own send completes the response (or ignores a disconnected one).
        more_body = message.get("more_body", False)
        await self._send(
            {"type": "http.response.body", "body": b"", "more_body": more_body}
        )


async def _send_file(
    cycle: RequestResponseCycle, file: int, offset: int, count: int
) -> int:
    """Send `count` bytes of `file` from `offset`; return how many were sent.

    Returns fewer only when the client disconnected, and then marks the cycle
    disconnected. Raises RuntimeError when the file ends early, so that the
    connection is closed.
    """
    transport = cycle.transport
    transport_socket = transport.get_extra_info("socket")
    if count > SEND_BUFFER_BYTES and _send_buffer_bytes:
        with contextlib.suppress(OSError):
            transport_socket.setsockopt(SOL_SOCKET, SO_SNDBUF, _send_buffer_bytes)
    socket = transport_socket.fileno()
    # Flow control then pauses on any buffered byte and resumes when the
    # buffer is empty, which is what a direct write to the socket needs.
    low, high = transport.get_write_buffer_limits()  # type: ignore[attr-defined]
    transport.set_write_buffer_limits(high=0, low=0)
    sent = 0
    try:
        while sent < count:
            await _wait_until_flushed(cycle)
            if cycle.disconnected:
                break
            try:
                written = os.sendfile(
                    socket, file, offset + sent, min(count - sent, SENDFILE_BYTES)
                )
            except BlockingIOError:
                sent += await _send_piece(cycle, file, offset + sent, count - sent)
                continue
            except (BrokenPipeError, ConnectionResetError):
                # uvicorn learns of the loss later; until then its send must
                # not complete the response as if every byte went out.
                cycle.disconnected = True
                transport.close()
                break
            if written == 0:
                raise RuntimeError("Response content shorter than Content-Length")
            sent += written
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)
    return sent


async def _send_body(
    cycle: RequestResponseCycle, body: ThreadedBody, count: int
) -> int:
    """Send `count` bytes of `body`; return how many were sent.

    Returns fewer only when the client disconnected. Raises RuntimeError when
    the body is shorter or longer than `count`, and whatever `read_chunk`
    raises, so that the connection is closed.
    """
    transport = cycle.transport
    # The threads write to a duplicate of the socket's descriptor. When the
    # client leaves, uvicorn closes the transport's descriptor while a thread
    # may still be writing, and a new connection can get the same number:
    # the duplicate keeps this connection's socket until the last trip ends.
    socket = os.dup(transport.get_extra_info("socket").fileno())
    loop = asyncio.get_running_loop()
    low, high = transport.get_write_buffer_limits()  # type: ignore[attr-defined]
    transport.set_write_buffer_limits(high=0, low=0)
    pending = memoryview(b"")
    sent = 0
    try:
        while sent < count:
            await _wait_until_flushed(cycle)
            if cycle.disconnected:
                break
            trip = loop.run_in_executor(
                _body_threads, _write_body, socket, body, pending, count - sent
            )
            try:
                written, pending, ended = await asyncio.shield(trip)
            except (BrokenPipeError, ConnectionResetError):
                cycle.disconnected = True
                transport.close()
                break
            except asyncio.CancelledError:
                # The thread still uses the body and the socket: wait for it
                # before the caller closes either.
                await asyncio.wait([trip])
                raise
            sent += written
            if ended and sent < count:
                raise RuntimeError("Response content shorter than Content-Length")
            if pending:
                # The socket is full: the transport sends a piece when it has
                # room, and its flow control reports when.
                piece = bytes(pending[:FALLBACK_BYTES])
                pending = pending[len(piece) :]
                transport.write(piece)
                sent += len(piece)
    finally:
        # No trip runs any more: each was awaited, also on cancellation.
        os.close(socket)
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)
    return sent


def _write_body(
    socket: int, body: ThreadedBody, pending: memoryview, remaining: int
) -> tuple[int, memoryview, bool]:
    """In a worker thread: write `pending`, then further pieces of `body`.

    Stops when the socket is full, after `THREAD_TRIP_BYTES`, or at the end of
    the body. Returns the bytes written, what is left of the current piece,
    and whether the body ended.
    """
    written = 0
    limit = min(remaining, THREAD_TRIP_BYTES)
    while written < limit:
        if not pending:
            chunk = body.read_chunk()
            if chunk is None:
                return written, pending, True
            if not chunk:
                # The body lets the bodies queued behind it go first.
                return written, pending, False
            pending = chunk
            if len(pending) > remaining - written:
                raise RuntimeError("Response content longer than Content-Length")
            continue
        try:
            count = os.write(socket, pending)
        except BlockingIOError:
            break
        written += count
        pending = pending[count:]
    return written, pending, False


def send_buffer_bytes(
    wmem_max: Path = Path("/proc/sys/net/core/wmem_max"),
    tcp_wmem: Path = Path("/proc/sys/net/ipv4/tcp_wmem"),
) -> int:
    """Return the SO_SNDBUF value to set for a large file body, or 0 to leave
    the buffer to the kernel.

    The value is `SEND_BUFFER_BYTES`, or 0 where the kernel's limits are
    unknown or where the locked buffer (twice the value, at most twice
    net.core.wmem_max) would not exceed what the kernel's own tuning may reach
    (the third field of net.ipv4.tcp_wmem).
    """
    try:
        cap = int(wmem_max.read_text())
        tuned = int(tcp_wmem.read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 0
    return SEND_BUFFER_BYTES if 2 * min(SEND_BUFFER_BYTES, cap) > tuned else 0


_send_buffer_bytes = send_buffer_bytes()


def size_body_threads(processes: int) -> None:
    """Give each of `processes` server processes an equal share of the cores for
    writing threaded bodies, at least one thread. Call before serving.

    More threads than cores cost CPU without sending faster, because they
    contend for the GIL and for the cores. Eight clients pulled a 1 GiB
    encrypted blob from two processes on a 2-core VM, six times per setting,
    alternating, at a load average of 16. Two body threads per process used a
    median of 0.52 s of server CPU per GiB, and one thread 0.45 s.

    NOTE: with one thread per process, a body whose file must be read from disk
    holds up the other threaded bodies of that process until its trip ends
    (`THREAD_TRIP_BYTES`). With page-cached files a trip takes milliseconds.
    """
    global _body_threads
    threads = max(1, (os.cpu_count() or 2) // processes)
    _body_threads.shutdown(wait=False)
    _body_threads = ThreadPoolExecutor(
        max_workers=threads, thread_name_prefix="moorage-body"
    )


async def _wait_until_flushed(cycle: RequestResponseCycle) -> None:
    while cycle.transport.get_write_buffer_size() and not cycle.disconnected:
        if cycle.flow.write_paused:
            await cycle.flow.drain()
        else:
            # NOTE: with a high-water mark of 0 the transport pauses the flow
            # whenever it buffers a byte, so this poll is a guard that should
            # not run.
            await asyncio.sleep(0.001)


async def _send_piece(
    cycle: RequestResponseCycle, file: int, offset: int, remaining: int
) -> int:
    """Write one piece through the transport, which sends it once the socket has
    room and then resumes the flow."""
    size = min(remaining, FALLBACK_BYTES)
    try:
        # A piece in the page cache is read on the event loop: RWF_NOWAIT
        # makes the read fail instead of waiting for the disk. That saves a
        # trip to a worker thread per full socket.
        piece = _read_cached(file, size, offset)
    except OSError:
        # Not cached, or the file system does not support RWF_NOWAIT.
        piece = await asyncio.to_thread(os.pread, file, size, offset)
    if not piece:
        raise RuntimeError("Response content shorter than Content-Length")
    cycle.transport.write(piece)
    return len(piece)


def _read_cached(file: int, size: int, offset: int) -> bytes:
    """Read `size` bytes of `file` from `offset` if they are in the page cache.

    Raises OSError (BlockingIOError when the bytes are not cached) otherwise.
    A read that gets only part of the bytes from the cache returns that part.
    """
    if _NOWAIT is None:
        raise OSError(errno.EOPNOTSUPP, "RWF_NOWAIT is not available here")
    buffer = bytearray(size)
    read = os.preadv(file, [buffer], offset, _NOWAIT)
    del buffer[read:]
    return bytes(buffer)


class ZeroCopyFileResponse(Response):
    """A response whose body is `count` bytes of an open file from `offset`.

    Only for a scope with the zero-copy extension (see `supports_zerocopy`).
    The headers must contain Content-Length. The file is closed at the end.
    """

    def __init__(
        self,
        file: BinaryIO,
        offset: int,
        count: int,
        status_code: int,
        headers: Mapping[str, str],
        media_type: str,
    ) -> None:
        super().__init__(
            status_code=status_code, headers=headers, media_type=media_type
        )
        self.file = file
        self.offset = offset
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send(
                {
                    "type": ZEROCOPY,
                    "file": self.file,
                    "offset": self.offset,
                    "count": self.count,
                    "more_body": False,
                }
            )
        finally:
            self.file.close()


class ThreadedBodyResponse(Response):
    """A response whose body of `count` bytes comes from a `ThreadedBody`.

    Only for a scope with the zero-copy extension (see `supports_zerocopy`).
    The headers must contain Content-Length. The body is closed at the end.
    """

    def __init__(
        self,
        body: ThreadedBody,
        count: int,
        status_code: int,
        headers: Mapping[str, str],
        media_type: str,
    ) -> None:
        super().__init__(
            status_code=status_code, headers=headers, media_type=media_type
        )
        self.threaded_body = body
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send(
                {
                    "type": ZEROCOPY,
                    "body": self.threaded_body,
                    "count": self.count,
                    "more_body": False,
                }
            )
        finally:
            self.threaded_body.close()


def supports_zerocopy(scope: Scope) -> bool:
    """Return whether the server sends files for this request without copies."""
    return ZEROCOPY in (scope.get("extensions") or {})
