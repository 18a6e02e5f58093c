"""Audit sinks: RFC 5424 syslog over UDP and TCP, and the webhook with retries."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import structlog.testing

from moorage.audit.events import GENESIS_HASH, AuditEvent, chain
from moorage.audit.sinks import WebhookSender
from tests.support.database import create_database, drop_database
from tests.support.receivers import SyslogReceiver, WebhookReceiver, wait_until
from tests.support.server import ServerProcess

# RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
RFC5424 = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<time>\S+Z) (?P<host>\S+) moorage (?P<pid>\d+) "
    rb"(?P<msgid>\S+) \[moorage@32473 (?P<sd>[^\]]*)\] \xef\xbb\xbf(?P<msg>.*)",
    re.DOTALL,
)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        data_dir = tmp_path / f"data{len(started)}"
        data_dir.mkdir()
        process = ServerProcess(
            data_dir=data_dir, database_url=create_database(data_dir)
        )
        process.extra_env.update(env)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        drop_database(process.database_url)


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_syslog_receives_events(start_server, protocol: str) -> None:  # type: ignore[no-untyped-def]
    """A failed login reaches the syslog server as a well-formed RFC 5424 message."""
    with SyslogReceiver(protocol) as receiver:
        server = start_server(MOORAGE_AUDIT_SYSLOG=receiver.address)
        response = httpx.get(f"{server.url}/v2/", auth=("nobody", "wrong-password-1"))
        assert response.status_code == 401
        assert wait_until(lambda: any(b"auth.login" in m for m in receiver.messages))
    message = next(m for m in receiver.messages if b"auth.login" in m)
    match = RFC5424.fullmatch(message)
    assert match is not None, message
    assert int(match["pri"]) == 13 * 8 + 4
    assert match["msgid"] == b"auth.login"
    body = json.loads(match["msg"])
    assert body["actor_account"] == "nobody"
    assert body["outcome"] == "failure"
    assert f'hash="{body["hash"]}"'.encode() in match["sd"]
    assert b"wrong-password-1" not in message


def test_webhook_retries_then_delivers(start_server) -> None:  # type: ignore[no-untyped-def]
    """The webhook sink retries after server errors and then delivers the events."""
    with WebhookReceiver(failures=2) as receiver:
        server = start_server(MOORAGE_AUDIT_WEBHOOK_URL=receiver.url)
        httpx.get(f"{server.url}/v2/", auth=("nobody", "wrong-password-1"))

        def delivered() -> list[str]:
            return [e["action"] for b in receiver.bodies for e in b["events"]]

        assert wait_until(lambda: "auth.login" in delivered(), timeout=15)
    assert receiver.attempts >= 3
    assert delivered().count("auth.login") == 1


async def test_webhook_queue_is_bounded() -> None:
    """With no receiver, the webhook queue keeps its capacity and counts drops."""
    sender = WebhookSender(
        "http://127.0.0.1:9/unreachable", capacity=5, attempts=1, first_delay=0.01
    )
    stored = chain([AuditEvent("blob.pull") for _ in range(50)], 0, GENESIS_HASH)
    sender.publish(stored)
    assert sender.depth() <= 5
    assert sender.dropped == 45
    await sender.close(drain_seconds=0.5)


async def test_webhook_full_queue_drops_the_oldest_waiting_events() -> None:
    """Events published while a batch is being retried are sent after it: the
    queue drops waiting events only, never the batch in flight, and every
    event is sent once or counted as dropped."""
    with WebhookReceiver(failures=1) as receiver:
        sender = WebhookSender(receiver.url, capacity=5, attempts=3, first_delay=0.5)
        stored = chain([AuditEvent("blob.pull") for _ in range(15)], 0, GENESIS_HASH)
        sender.publish(stored[:5])
        assert await asyncio.to_thread(wait_until, lambda: receiver.attempts == 1)
        # The first batch (events 1-5) failed once and waits for its retry.
        sender.publish(stored[5:])
        await sender.close(drain_seconds=10)
    received = [event["seq"] for body in receiver.bodies for event in body["events"]]
    assert sender.dropped == 5
    assert received == [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Capture this process's structlog lines of every level (the test
    session's configuration keeps critical ones only)."""
    previous = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG)
    )
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**previous)


async def test_sink_drops_logged_per_interval(
    captured_logs: list[dict[str, Any]],
) -> None:
    """A full queue logs its first drop at once, then one line per interval
    with the drops since the previous line. close logs the drops that no line
    has counted yet."""
    sender = WebhookSender(
        "http://127.0.0.1:9/unreachable", capacity=5, attempts=1, first_delay=0.01
    )
    sender.drop_log_seconds = 0.3
    stored = chain([AuditEvent("blob.pull") for _ in range(1462)], 0, GENESIS_HASH)

    def drop_lines() -> list[tuple[int, int]]:
        return [
            (entry["dropped"], entry["dropped_total"])
            for entry in captured_logs
            if entry["event"] == "audit sink queue full; dropped the oldest events"
        ]

    sender.publish(stored[:1455])
    assert drop_lines() == [(1, 1)]
    await asyncio.sleep(0.5)
    assert drop_lines() == [(1, 1), (1449, 1450)]
    # The receiver refuses connections, so the queue is empty again. After an
    # interval without drops, the next drop is logged at once.
    await asyncio.sleep(0.5)
    assert sender.depth() == 0
    sender.publish(stored[1455:])
    assert drop_lines()[2:] == [(1, 1451)]
    await sender.close(drain_seconds=0.1)

    assert sender.dropped == 1452
    assert drop_lines()[3:] == [(1, 1452)]
