"""Request bodies through the protocol's queue of body pieces (moorage.zerocopy)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from moorage.zerocopy import BODY_HIGH_WATER, ZeroCopyProtocol


class EchoDigestApp:
    """Responds to each request with the sha256 and length of its body, after
    taking the body's messages slowly when `?slow=1`. Records per request the
    number of body messages and what a `receive` after the body returned."""

    def __init__(self) -> None:
        self.messages: list[int] = []
        self.after_body: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        slow = b"slow=1" in scope["query_string"]
        hasher = hashlib.sha256()
        size = 0
        count = 0
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            assert isinstance(message["body"], bytes)
            hasher.update(message["body"])
            size += len(message["body"])
            count += 1
            if slow:
                await asyncio.sleep(0.005)
            if not message.get("more_body", False):
                break
        self.messages.append(count)
        waiter = asyncio.ensure_future(receive())
        await asyncio.sleep(0.01)
        assert not waiter.done(), "receive after the body returned before the end"
        answer = f"{hasher.hexdigest()} {size}".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})
        self.after_body.append((await asyncio.wait_for(waiter, 5))["type"])


@pytest.fixture
async def server() -> AsyncIterator[tuple[EchoDigestApp, int]]:
    app = EchoDigestApp()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=ZeroCopyProtocol, log_config=None, lifespan="off", access_log=False
    )
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve(sockets=[listener]))
    while not instance.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        yield app, listener.getsockname()[1]
    finally:
        instance.should_exit = True
        await task


def request(body: bytes, target: str = "/", extra: str = "") -> bytes:
    head = (
        f"POST {target} HTTP/1.1\r\nHost: test\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> str:
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return (await reader.readexactly(length)).decode()


def expected(body: bytes) -> str:
    return f"{hashlib.sha256(body).hexdigest()} {len(body)}"


@pytest.mark.parametrize("slow", [False, True])
async def test_large_body_arrives_whole(server: Any, slow: bool) -> None:
    """Every byte arrives in order, also when the application falls behind by
    more than the high-water mark and reading pauses."""
    app, port = server
    body = os.urandom(4 * BODY_HIGH_WATER + 1234)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(body, "/?slow=1" if slow else "/"))
    assert await read_answer(reader) == expected(body)
    assert app.messages[0] > 1
    for _ in range(500):
        if app.after_body:
            break
        await asyncio.sleep(0.01)
    assert app.after_body == ["http.disconnect"]
    writer.close()


async def test_pipelined_requests_keep_their_bodies(server: Any) -> None:
    """Two requests sent at once on one connection each get their own body,
    although the second one's body arrives while the first is handled."""
    _, port = server
    first, second = os.urandom(3 * BODY_HIGH_WATER), os.urandom(70_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(first, "/?slow=1") + request(second))
    assert await read_answer(reader) == expected(first)
    assert await read_answer(reader) == expected(second)
    writer.close()


async def test_empty_body(server: Any) -> None:
    app, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(b""))
    assert await read_answer(reader) == expected(b"")
    assert app.messages == [1]
    writer.close()


async def test_expect_continue(server: Any) -> None:
    """With `Expect: 100-continue` the body follows the interim response."""
    _, port = server
    body = os.urandom(300_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = request(body, extra="Expect: 100-continue\r\n")[: -len(body)]
    writer.write(head)
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(body)
    assert await read_answer(reader) == expected(body)
    writer.close()
