"""The supervisor's password service computes the workers' hashes and checks."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from moorage.auth import password_service
from moorage.auth.argon2id import HASHER
from moorage.auth.password_service import PasswordService, PasswordServiceError


@pytest.fixture
def served() -> Iterator[tuple[PasswordService, socket.socket]]:
    """A client with one socket, served by `serve` in a thread."""
    own, theirs = socket.socketpair()
    thread = threading.Thread(
        target=password_service.serve,
        args=(own.detach(), threading.BoundedSemaphore(1)),
        daemon=True,
    )
    thread.start()
    yield PasswordService([theirs]), theirs
    theirs.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_hash_then_verify(served: tuple[PasswordService, socket.socket]) -> None:
    """A hash made by the service verifies the password and no other."""
    service, _ = served
    stored = service.hash("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert not HASHER.check_needs_rehash(stored)
    assert service.verify(stored, "correct horse battery")
    assert not service.verify(stored, "wrong horse battery")


def test_unknown_account_and_malformed_hash_fail(
    served: tuple[PasswordService, socket.socket],
) -> None:
    """A check without a stored hash runs against the dummy hash and fails, and
    a malformed stored hash fails instead of raising."""
    service, _ = served
    assert not service.verify(None, "anything")
    assert not service.verify("not-a-hash", "anything")


def test_malformed_request_is_an_error(
    served: tuple[PasswordService, socket.socket],
) -> None:
    """A request the service cannot read gets an error reply, and the socket
    keeps working."""
    service, sock = served
    password_service.send(sock.fileno(), {"op": "hash"})
    assert password_service.receive(sock.fileno()) == {"error": "malformed request"}
    password_service.send(sock.fileno(), {"op": "drop", "password": "x"})
    assert password_service.receive(sock.fileno()) == {"error": "unknown request"}
    assert service.verify(service.hash("pw"), "pw")


def test_oversized_request_is_an_error(
    served: tuple[PasswordService, socket.socket],
) -> None:
    """A message over the limit gets an error reply after the service reads
    past it, and the socket keeps working: a closed one would leave its worker
    without password checks until restart."""
    service, sock = served
    size = password_service.MAX_MESSAGE_BYTES * 2 + 5
    sock.sendall(struct.pack("!I", size) + b"x" * size)
    reply = password_service.receive(sock.fileno())
    assert reply == {"error": f"unreadable request: message of {size} bytes"}
    assert service.verify(service.hash("pw"), "pw")


def test_oversized_message_not_sent(
    served: tuple[PasswordService, socket.socket],
) -> None:
    """The client refuses to send a message over the limit, and its socket
    stays in step."""
    service, _ = served
    with pytest.raises(PasswordServiceError):
        service.hash("x" * password_service.MAX_MESSAGE_BYTES)
    assert service.verify(service.hash("pw"), "pw")


def test_unreadable_request_is_an_error(
    served: tuple[PasswordService, socket.socket],
) -> None:
    """A message that is not JSON gets an error reply; the socket keeps working."""
    service, sock = served
    sock.sendall(struct.pack("!I", 3) + b"{{{")
    reply = password_service.receive(sock.fileno())
    assert reply is not None
    assert reply["error"].startswith("unreadable request")
    assert service.verify(service.hash("pw"), "pw")


def test_closed_service_raises() -> None:
    """A worker whose supervisor is gone gets an error, not a failed login."""
    own, theirs = socket.socketpair()
    own.close()
    with pytest.raises(PasswordServiceError):
        PasswordService([theirs]).verify(None, "pw")
    theirs.close()
