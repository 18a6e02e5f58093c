"""uvicorn's httptools protocol with a limit on the size of a request's head.

httptools gathers a header's name and value in memory until the line ends, and
uvicorn sets no limit, so one client could make a worker hold gigabytes by
sending a header line without an end. `LimitedHttpToolsProtocol` counts the
bytes received from the start of each request until its headers are complete.
Beyond `MAX_HEAD_BYTES` it responds with 431 and closes the connection. A head
that completes within a large piece (which may contain some of the body too)
is measured exactly once it is parsed. Heads that arrive in smaller pieces,
nearly all of them, cost one addition per piece.

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


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head over the limit."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    # Bytes received since the request began, while its head is incomplete.
    _head_bytes = 0
    _in_head = True
    _head_rejected = False

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        # Parsed first: the piece may complete the head and go on into the body
        # (see on_headers_complete). A piece is at most the event loop's read
        # size (256 KiB for uvloop), so that much is parsed at most.
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._reject_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_bytes > MAX_HEAD_BYTES and _head_size(self) > MAX_HEAD_BYTES:
            # uvicorn turns the parser's error into send_400_response, below.
            self._head_rejected = True
            raise _HeadTooLarge
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_rejected:
            self._reject_head()
        else:
            super().send_400_response(msg)

    def _reject_head(self) -> None:
        if self.transport.is_closing():
            return
        self.logger.warning(
            "request rejected: request line and header fields over %d bytes (431)",
            MAX_HEAD_BYTES,
        )
        self.transport.write(_TOO_LARGE_RESPONSE)
        self.transport.close()


def _head_size(protocol: HttpToolsProtocol) -> int:
    """Return the bytes of a complete head, counted only for heads that came in
    large pieces: the target, and each header with its ": " and line end. The
    method and version are left out, so the count is at most 20 bytes short."""
    headers = sum(len(n) + len(v) + 4 for n, v in protocol.headers)
    return len(protocol.url) + headers
