"""Password hashes and checks of the worker processes, computed by the supervisor.

An argon2id computation touches 7 MiB (see `moorage.auth.argon2id`). A worker
that computes its own keeps that much more in its peak resident memory, and
after its second computation glibc keeps the 7 MiB resident, because the
first free raised its mmap threshold. With `workers` > 1 every worker would
pay this, although together they run at most ARGON2_SLOTS computations at once.
So the workers send their hashes and checks over socket pairs to
`moorage.supervisor`, a process of about 12 MiB that imports argon2-cffi at the
first request and computes in one thread per socket, at most `slots` at once.

A message is a 4-byte big-endian length and a JSON object. Requests and replies:
`{"op": "hash", "password": str}` returns `{"hash": str}`;
`{"op": "verify", "hash": str | null, "password": str}` returns
`{"matches": bool}`, where a null hash is checked against a dummy hash and fails;
a request that cannot be served returns `{"error": str}`.

This module imports only the standard library and works on file descriptors,
because the socket module alone adds 0.7 MiB to the supervisor.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import struct
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket

_LENGTH = struct.Struct("!I")
# Requests carry one password and hash, so anything larger is a broken peer.
MAX_MESSAGE_BYTES = 64 * 1024


class PasswordServiceError(Exception):
    """The supervisor's password service failed or cannot be reached."""


class MessageTooLarge(ValueError):
    """A message over MAX_MESSAGE_BYTES; the stream stays in step."""


def send(descriptor: int, message: dict[str, Any]) -> None:
    """Send one message; raise MessageTooLarge, before writing anything, for
    one over MAX_MESSAGE_BYTES."""
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"message of {len(data)} bytes")
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(descriptor, view) :]


def receive(descriptor: int) -> Any:
    """Return the next message, or None when the peer closed the socket.

    Raise MessageTooLarge for a message over MAX_MESSAGE_BYTES, after reading
    past it, and ValueError for one that is not JSON: the next message can
    still be read after either.
    """
    header = _receive_exactly(descriptor, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_MESSAGE_BYTES:
        while length > 0:
            skipped = _receive_exactly(descriptor, min(length, MAX_MESSAGE_BYTES))
            if skipped is None:
                return None
            length -= len(skipped)
        raise MessageTooLarge(f"message of {_LENGTH.unpack(header)[0]} bytes")
    body = _receive_exactly(descriptor, length)
    return None if body is None else json.loads(body)


def _receive_exactly(descriptor: int, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        chunk = os.read(descriptor, count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


class PasswordService:
    """A worker's client of the supervisor's password service.

    Each socket carries one request at a time, so the number of sockets bounds
    this worker's concurrent requests. A further caller blocks until a socket
    is free, so call it from threads (asyncio.to_thread), never on the event
    loop.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._idle: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        for sock in sockets:
            self._idle.put(sock)

    def hash(self, password: str) -> str:
        reply = self._call({"op": "hash", "password": password})
        return str(reply["hash"])

    def verify(self, password_hash: str | None, password: str) -> bool:
        request = {"op": "verify", "hash": password_hash, "password": password}
        return bool(self._call(request)["matches"])

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        sock = self._idle.get()
        try:
            send(sock.fileno(), request)
            reply = receive(sock.fileno())
        except (OSError, ValueError) as error:
            raise PasswordServiceError(f"password service failed: {error}") from error
        finally:
            # A thread cannot be cancelled between send and receive, so the
            # socket never contains an unread reply here.
            self._idle.put(sock)
        if reply is None:
            raise PasswordServiceError("the supervisor closed the password socket")
        if not isinstance(reply, dict) or "error" in reply:
            raise PasswordServiceError(f"password service error: {reply!r}")
        return reply


def serve(descriptor: int, slots: threading.Semaphore) -> None:
    """Serve one worker's requests on the socket `descriptor` until the worker
    closes it, then close it.

    Runs in a thread of the supervisor; `slots` bounds the computations of all
    threads together.
    """
    try:
        while True:
            try:
                request = receive(descriptor)
            except ValueError as error:
                # The message was framed, so the stream is still in step: reply
                # and continue. Closing would leave the worker without checks.
                send(descriptor, {"error": f"unreadable request: {error}"})
                continue
            if request is None:
                return
            with slots:
                reply = _answer(request)
            send(descriptor, reply)
    except OSError:
        return
    finally:
        os.close(descriptor)


def _answer(request: Any) -> dict[str, Any]:
    # Imported at the first request, so that a server without password logins
    # does not load argon2-cffi into the supervisor.
    from moorage.auth.argon2id import HASHER, matches

    if not isinstance(request, dict) or not isinstance(request.get("password"), str):
        return {"error": "malformed request"}
    password = request["password"]
    stored = request.get("hash")
    if request.get("op") == "hash":
        return {"hash": HASHER.hash(password)}
    if request.get("op") == "verify" and stored is None:
        # The same time as a real check, so that an unknown login cannot be
        # distinguished by its speed.
        matches(HASHER, _dummy_hash(), password)
        return {"matches": False}
    if request.get("op") == "verify" and isinstance(stored, str):
        return {"matches": matches(HASHER, stored, password)}
    return {"error": "unknown request"}


@functools.cache
def _dummy_hash() -> str:
    from moorage.auth.argon2id import HASHER

    # os.urandom, because the secrets module loads OpenSSL (about 5 MiB).
    return HASHER.hash(os.urandom(16).hex())
