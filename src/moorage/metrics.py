"""The registry's Prometheus metrics (served by `moorage.api.metrics`).

Label values come from bounded sets only: route names, methods, status codes,
customers (plus "vendor" and "anonymous"), alert kinds, audit sink kinds.
Repositories and accounts are never labels, so the number of series grows with
customers only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.audit.events import (
    ALERT_PREFIX,
    AUTH_LOGIN,
    AUTH_TOKEN,
    FAILURE,
    TOKEN_ISSUE,
    AuditEvent,
)
from moorage.db import stats

# Stored bytes need a database scan, so the figure is refreshed at most this often.
STORED_BYTES_SECONDS = 60
ANONYMOUS = "anonymous"
# Latency buckets in seconds, from a cached manifest read to a large blob.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The registry's metrics, in a collector registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "moorage_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "moorage_http_request_duration_seconds",
            "Time from request start to the end of the response, by route.",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.bytes_out = Counter(
            "moorage_http_response_bytes",
            "Response body bytes sent, by customer.",
            ["customer"],
            registry=r,
        )
        self.bytes_in = Counter(
            "moorage_http_request_bytes",
            "Blob and manifest bytes received, by customer.",
            ["customer"],
            registry=r,
        )
        self.failed_logins = Counter(
            "moorage_failed_logins", "Failed authentications.", registry=r
        )
        self.token_issues = Counter(
            "moorage_token_issues", "Tokens issued by /token.", registry=r
        )
        self.alerts = Counter(
            "moorage_alerts", "Alerts raised, by kind.", ["kind"], registry=r
        )
        self.active_uploads = Gauge(
            "moorage_active_uploads", "Upload sessions not yet finished.", registry=r
        )
        self.stored_bytes = Gauge(
            "moorage_stored_bytes",
            "Bytes of distinct blobs in each customer's namespaces.",
            ["customer"],
            registry=r,
        )
        self.audit_queue = Gauge(
            "moorage_audit_queue_depth",
            "Audit events waiting to be written.",
            registry=r,
        )
        self.audit_written = Gauge(
            "moorage_audit_events_written",
            "Audit events written by this process since it started.",
            registry=r,
        )
        self.audit_sink_dropped = Counter(
            "moorage_audit_sink_dropped",
            "Audit events that a sink dropped because its queue was full, by sink.",
            ["sink"],
            registry=r,
        )
        # Each sink's drop count at the last refresh, to add only what is new.
        self._sink_drops: dict[str, int] = {}
        self._stored_at = 0.0
        # Labelled children, looked up once: labels() costs several microseconds.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._byte_children: dict[str, tuple[Any, Any]] = {}

    def observe_request(
        self,
        route: str,
        method: str,
        status: int,
        seconds: float,
        customer: str,
        sent: int,
        received: int,
    ) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if sent or received:
            out_child, in_child = self._customer_children(customer)
            if sent:
                out_child.inc(sent)
            if received:
                in_child.inc(received)

    def _customer_children(self, customer: str) -> tuple[Any, Any]:
        children = self._byte_children.get(customer)
        if children is None:
            children = (self.bytes_out.labels(customer), self.bytes_in.labels(customer))
            self._byte_children[customer] = children
        return children

    def observe_event(self, event: AuditEvent) -> None:
        """Count logins, token issues and alerts from the audit stream."""
        if event.action in (AUTH_LOGIN, AUTH_TOKEN) and event.outcome == FAILURE:
            self.failed_logins.inc()
        elif event.action == TOKEN_ISSUE:
            self.token_issues.inc()
        elif event.action.startswith(ALERT_PREFIX):
            self.alerts.labels(event.action.removeprefix(ALERT_PREFIX)).inc()

    async def refresh(
        self,
        engine: AsyncEngine,
        queued: int,
        written: int,
        sink_drops: Mapping[str, int],
    ) -> None:
        """Update the figures that come from the database and the audit log.

        `sink_drops` maps each audit sink's name to the events it has dropped
        since the process started.
        """
        self.active_uploads.set(await stats.count_uploads(engine))
        self.audit_queue.set(queued)
        self.audit_written.set(written)
        self.count_sink_drops(sink_drops)
        if time.monotonic() - self._stored_at >= STORED_BYTES_SECONDS:
            self._stored_at = time.monotonic()
            totals = await stats.stored_bytes_by_customer(engine)
            for slug in await stats.customer_slugs(engine):
                totals.setdefault(slug, 0)
            self.stored_bytes.clear()
            for customer, total in totals.items():
                self.stored_bytes.labels(customer).set(total)

    def count_sink_drops(self, sink_drops: Mapping[str, int]) -> None:
        """Add each sink's drops since the last call to its counter."""
        for sink, total in sink_drops.items():
            counted = self._sink_drops.get(sink, 0)
            # The labelled series exists from the first refresh, at 0.
            self.audit_sink_dropped.labels(sink).inc(max(total - counted, 0))
            self._sink_drops[sink] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
