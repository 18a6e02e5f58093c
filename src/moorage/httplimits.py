"""uvicorn's httptools protocol with a limit on the size of a request's head.

httptools gathers a header's name and value in memory until the line ends, and
uvicorn sets no limit, so one client could make a worker hold gigabytes by
sending a header line without an end. `LimitedHttpToolsProtocol` counts the
bytes received from the start of each request until its headers are complete.
A piece that takes the count past `MAX_HEAD_BYTES` is parsed only up to the
limit. If the head is still incomplete there, the protocol responds with 431
and closes the connection, and otherwise it parses the rest of the piece.
Heads that arrive in smaller pieces, nearly all of them, cost one addition per
piece.

No callback raises to stop the parser, because uvicorn (0.55) logs every
parser error as "Invalid HTTP request received." before it sends a response.

NOTE: the connection is closed with the rest of the head unread, so Linux may
answer the client's next bytes with a reset, and a client far away may see
the reset before the 431. The request is refused either way.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Bytes of a request line and headers at most. A bearer token's header takes 1
# to 2 KiB; nginx allows 32 KiB by default and Go's net/http 1 MiB.
MAX_HEAD_BYTES = 64 * 1024

_TOO_LARGE = b"request line and headers larger than 65536 bytes\n"
_TOO_LARGE_RESPONSE = b"".join(
    [
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(_TOO_LARGE),
        b"connection: close\r\n",
        b"\r\n",
        _TOO_LARGE,
    ]
)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    # Bytes received since the request began, while its head is incomplete.
    _head_bytes = 0
    _in_head = True

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        room = MAX_HEAD_BYTES - self._head_bytes
        self._head_bytes += len(data)
        if len(data) <= room:
            super().data_received(data)
            return
        # The piece may complete the head and go on into the body, so the
        # head is parsed up to the limit first. A memoryview slice copies
        # nothing, and httptools accepts any buffer.
        view = memoryview(data)
        if room > 0:
            super().data_received(view[:room])  # type: ignore[arg-type]
        if self.transport.is_closing():
            return
        if self._in_head:
            self._reject_head()
            return
        # The rest of the piece is body, or the start of the next request.
        self.data_received(view[room:])

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def _reject_head(self) -> None:
        if self.transport.is_closing():
            return
        self.logger.warning(
            "request rejected: request line and header fields over %d bytes (431)",
            MAX_HEAD_BYTES,
        )
        self.transport.write(_TOO_LARGE_RESPONSE)
        self.transport.close()
