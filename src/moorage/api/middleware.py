"""ASGI middleware: the API version header and one log line per request."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moorage.api.errors import UNKNOWN, error_body
from moorage.api.http import API_VERSION_HEADER
from moorage.api.observe import FinishedRequest, RequestObserver
from moorage.api.request_context import current_scope
from moorage.storage.encryption.format import DataKeyUnavailableError, IntegrityError
from moorage.zerocopy import ZEROCOPY

log = structlog.get_logger("moorage.request")

_VERSION_HEADER = (
    API_VERSION_HEADER[0].lower().encode(),
    API_VERSION_HEADER[1].encode(),
)
# Request state keys copied into the request log line, in this order.
_LOG_FIELDS = (
    "repository",
    "reference",
    "digest",
    "upload_id",
    "subject",
    "bytes_sent",
    "bytes_received",
    "error_code",
)
# Probes and metrics skip the wait for room in the audit queue: they record no
# audit event when they succeed, and they must respond while the writer is behind.
_UNQUEUED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestIds:
    """Request ids: 32 hex digits, a random prefix per process and a counter.

    They are unique without a random draw (a system call) per request, and
    they are not secrets. A forked child draws a new prefix.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_request_ids = RequestIds()

_UNKNOWN_MESSAGE = "internal server error; see the server log"
# The reason recorded, in the audit trail and the request log, for a response
# cut short or refused because stored data failed its integrity check.
STORAGE_INTEGRITY_CODE = "STORAGE_INTEGRITY"
_INTEGRITY_MESSAGE = (
    "stored data failed its integrity check and was not served; "
    "the registry's operators have been alerted"
)


class RequestMiddleware:
    """Adds `Docker-Distribution-API-Version` and `X-Request-Id`, logs each request,
    and turns an unexpected exception into the spec's 500 UNKNOWN error."""

    def __init__(self, app: ASGIApp, observer: RequestObserver | None = None) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if self.observer is not None and scope["path"] not in _UNQUEUED_PATHS:
            await self.observer.wait_for_audit_room()
        request_id = _request_ids.new()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        # Events that the storage layer records while serving this request
        # (storage.integrity) name its caller through this (see request_context).
        scope_token = current_scope.set(scope)
        response: dict[str, Any] = {"status": None, "sent": 0}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append(_VERSION_HEADER)
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)
            # Counted once sent: a body that fails part way (a segment that
            # fails its integrity check, a client gone) counts only what the
            # sender reports as written, nothing when it raises.
            if message["type"] == "http.response.body":
                response["sent"] += len(message.get("body", b""))
            elif message["type"] == ZEROCOPY:
                response["sent"] += message.get("sent", 0)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            response["status"] = response["status"] or 499
            state["error_code"] = "CLIENT_DISCONNECTED"
        except Exception as error:
            # The encryption layer has logged an integrity failure and recorded
            # storage.integrity. A data key destroyed by shredding is not one:
            # the registry turns it into a not-found, so one here is a bug.
            tampered = isinstance(error, IntegrityError) and not isinstance(
                error, DataKeyUnavailableError
            )
            state["error_code"] = STORAGE_INTEGRITY_CODE if tampered else UNKNOWN.code
            if not tampered:
                log.exception(
                    "unexpected error", request_id=request_id, path=scope["path"]
                )
            if response["status"] is None:
                response["status"] = UNKNOWN.status
                message = _INTEGRITY_MESSAGE if tampered else _UNKNOWN_MESSAGE
                await _send_unknown(send_with_headers, message)
        finally:
            current_scope.reset(scope_token)
            _log_request(scope, state, response["status"], started)
            if self.observer is not None:
                await self._observe(scope, state, response, started)

    async def _observe(
        self,
        scope: Scope,
        state: dict[str, Any],
        response: dict[str, Any],
        started: float,
    ) -> None:
        assert self.observer is not None
        finished = FinishedRequest(
            scope=scope,
            state=state,
            status=response["status"] or 0,
            seconds=time.perf_counter() - started,
            bytes_sent=response["sent"],
        )
        try:
            await self.observer.observe(finished)
        except Exception:
            log.exception("request observer failed", request_id=state["request_id"])


async def _send_unknown(send: Send, message: str = _UNKNOWN_MESSAGE) -> None:
    body = error_body(UNKNOWN.code, message)
    await send(
        {
            "type": "http.response.start",
            "status": UNKNOWN.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _log_request(
    scope: Scope, state: dict[str, Any], status: int | None, started: float
) -> None:
    endpoint = scope.get("endpoint")
    fields: dict[str, Any] = {
        "method": scope["method"],
        "route": getattr(endpoint, "__name__", None),
        "path": scope["path"],
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "request_id": state.get("request_id"),
    }
    caller = state.get("caller")
    if caller is not None:
        fields["subject"] = caller.principal.login
        fields["customer"] = caller.principal.customer_slug
    for key in _LOG_FIELDS:
        if key in state and key not in fields:
            fields[key] = state[key]
    log.info("request", **fields)
