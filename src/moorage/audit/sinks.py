"""Sinks that forward audit events as they are written: syslog and a webhook.

Each sink keeps its own bounded queue and sends from a background task, so a
slow or absent receiver never holds up the audit writer. When a queue is full
the oldest events are dropped and counted (the metric
moorage_audit_sink_dropped_total), and logged: the first drop at once, then
one line per DROP_LOG_SECONDS while drops go on. The database keeps them all.

The RFC 5424 formatter is written here because the standard library's
SysLogHandler sends the older BSD format (RFC 3164) and a compliant message is
one line of formatting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import structlog

from moorage.audit.events import ALERT_PREFIX, FAILURE, StoredEvent, format_time
from moorage.config import hide_url_secrets

log = structlog.get_logger(__name__)

# RFC 5424 facility 13 is "log audit"; severities 4 (warning) and 5 (notice).
SYSLOG_FACILITY = 13
# NOTE: 32473 is the private enterprise number that RFC 5612 reserves for
# documentation. A deployment that parses the structured data by SD-ID may
# want its own number here.
SD_ID = "moorage@32473"
# A sink that drops events logs at most one line per this many seconds, with
# the count since its previous line.
DROP_LOG_SECONDS = 60.0


class _QueuedSender:
    """A bounded queue drained by one task; subclasses send one batch.

    The batch being sent leaves the queue when its send starts, so a full
    queue drops events that wait, never the ones in flight. At most
    `capacity` events wait and `batch_size` more are in flight.
    """

    name = "sink"

    def __init__(self, capacity: int, batch_size: int) -> None:
        self._pending: deque[dict[str, Any]] = deque()
        self._capacity = capacity
        self._batch_size = batch_size
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.dropped = 0
        self.sent = 0
        self.drop_log_seconds = DROP_LOG_SECONDS
        self._unlogged_drops = 0
        # Set while drops are logged: the call that logs the next interval's.
        self._drop_log_timer: asyncio.TimerHandle | None = None

    def put(self, item: dict[str, Any]) -> None:
        if len(self._pending) >= self._capacity:
            self._pending.popleft()
            self.dropped += 1
            self._unlogged_drops += 1
            if self._drop_log_timer is None:
                self._log_drops()
        self._pending.append(item)
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"audit-{self.name}")
        self._wakeup.set()

    def depth(self) -> int:
        return len(self._pending) + self._in_flight

    def _log_drops(self) -> None:
        """Log the drops since the previous line, if any, and check again after
        `drop_log_seconds`. The checks stop after an interval without drops,
        and the next drop is logged at once."""
        if self._unlogged_drops == 0:
            self._drop_log_timer = None
            return
        self._write_drop_line()
        self._drop_log_timer = asyncio.get_running_loop().call_later(
            self.drop_log_seconds, self._log_drops
        )

    def _write_drop_line(self) -> None:
        log.warning(
            "audit sink queue full; dropped the oldest events",
            sink=self.name,
            dropped=self._unlogged_drops,
            dropped_total=self.dropped,
        )
        self._unlogged_drops = 0

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                count = min(len(self._pending), self._batch_size)
                batch = [self._pending.popleft() for _ in range(count)]
                self._in_flight = count
                try:
                    await self._send_batch(batch)
                finally:
                    self._in_flight = 0
                self.sent += count
            self._idle.set()

    async def _send_batch(self, batch: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    async def close(self, drain_seconds: float = 5) -> None:
        """Send what is queued, waiting at most `drain_seconds`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_seconds):
                await self._idle.wait()
        if self._drop_log_timer is not None:
            self._drop_log_timer.cancel()
            self._drop_log_timer = None
        if self._unlogged_drops:
            self._write_drop_line()
        if self.depth():
            log.warning(
                "audit sink stopped with events unsent",
                sink=self.name,
                unsent=self.depth(),
            )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(stored: StoredEvent, hostname: str, procid: int) -> bytes:
    """Format one event as an RFC 5424 message; the MSG part is the event JSON."""
    event = stored.event
    failed = event.outcome == FAILURE or event.action.startswith(ALERT_PREFIX)
    priority = SYSLOG_FACILITY * 8 + (4 if failed else 5)
    params = {"seq": str(stored.seq), "hash": stored.hash, "outcome": event.outcome}
    data = " ".join(f'{key}="{_sd_escape(value)}"' for key, value in params.items())
    header = (
        f"<{priority}>1 {format_time(event.time)} {hostname[:255] or '-'} moorage "
        f"{procid} {event.action[:32]} [{SD_ID} {data}]"
    )
    body = json.dumps(stored.to_dict(), separators=(",", ":"), ensure_ascii=False)
    return header.encode() + b" \xef\xbb\xbf" + body.encode()


class SyslogSink(_QueuedSender):
    """Sends RFC 5424 messages over UDP (one per datagram) or TCP (RFC 6587
    octet counting) to `udp://host:port` or `tcp://host:port`."""

    name = "syslog"

    def __init__(self, address: str, capacity: int = 10_000) -> None:
        super().__init__(capacity, batch_size=100)
        parts = urlsplit(address)
        if parts.scheme not in {"udp", "tcp"} or not parts.hostname or not parts.port:
            raise ValueError(
                f"invalid syslog address {address!r}: use udp://host:port or "
                "tcp://host:port"
            )
        self.protocol = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self._hostname = socket.gethostname()
        self._writer: asyncio.StreamWriter | None = None
        self._udp: asyncio.DatagramTransport | None = None

    def publish(self, events: Sequence[StoredEvent]) -> None:
        for stored in events:
            self.put({"message": syslog_message(stored, self._hostname, os.getpid())})

    async def _send_batch(self, batch: list[dict[str, Any]]) -> None:
        messages = [item["message"] for item in batch]
        delay = 0.5
        while True:
            try:
                await self._send(messages)
                return
            except OSError as error:
                log.warning(
                    "syslog send failed; retrying",
                    address=f"{self.protocol}://{self.host}:{self.port}",
                    error=str(error),
                    retry_in_seconds=delay,
                )
                await self._disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)

    async def _send(self, messages: list[bytes]) -> None:
        if self.protocol == "udp":
            if self._udp is None:
                loop = asyncio.get_running_loop()
                self._udp, _ = await loop.create_datagram_endpoint(
                    asyncio.DatagramProtocol, remote_addr=(self.host, self.port)
                )
            for message in messages:
                self._udp.sendto(message)
            return
        if self._writer is None:
            _, self._writer = await asyncio.open_connection(self.host, self.port)
        for message in messages:
            self._writer.write(str(len(message)).encode() + b" " + message)
        await self._writer.drain()

    async def _disconnect(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    async def close(self, drain_seconds: float = 5) -> None:
        await super().close(drain_seconds)
        await self._disconnect()


class WebhookSender(_QueuedSender):
    """POSTs JSON batches to a URL, `{"events": [...]}` (or another envelope key),
    retried with exponential backoff.

    A batch that still fails after `attempts` tries is dropped and logged.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        capacity: int = 10_000,
        attempts: int = 5,
        timeout: float = 10,
        first_delay: float = 0.5,
        envelope: str = "events",
    ) -> None:
        super().__init__(capacity, batch_size=100)
        self.url = url
        self.envelope = envelope
        self.attempts = attempts
        self.first_delay = first_delay
        # Imported here, so that servers without a webhook sink do not hold
        # httpx and its dependencies (about 2 MiB per worker process).
        import httpx

        self._client = httpx.AsyncClient(timeout=timeout)

    def publish(self, events: Sequence[StoredEvent]) -> None:
        for stored in events:
            self.put(stored.to_dict())

    async def _send_batch(self, batch: list[dict[str, Any]]) -> None:
        import httpx

        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self._client.post(
                    self.url, json={self.envelope: batch}
                )
                if response.status_code < 300:
                    return
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
            log.warning(
                "webhook delivery failed",
                url=hide_url_secrets(self.url),
                attempt=attempt,
                attempts=self.attempts,
                error=problem,
            )
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)
        log.error(
            "webhook batch dropped", url=hide_url_secrets(self.url), events=len(batch)
        )

    async def close(self, drain_seconds: float = 5) -> None:
        await super().close(drain_seconds)
        await self._client.aclose()
