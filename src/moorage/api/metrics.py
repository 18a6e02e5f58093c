"""`GET /metrics`: the Prometheus text format, behind a bearer token or, when
none is configured, for clients on this machine only."""

from __future__ import annotations

import hmac
import ipaddress

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.api.http import client_address
from moorage.errors import DeniedError, UnauthorizedError
from moorage.services import Services


class MetricsTokenError(UnauthorizedError):
    """A missing or wrong bearer token at /metrics."""

    def __init__(self) -> None:
        super().__init__("the metrics endpoint requires its bearer token")
        self.headers = {"WWW-Authenticate": 'Bearer realm="metrics"'}


def routes(services: Services) -> list[Route]:
    expected = services.settings.metrics_token

    async def metrics(request: Request) -> Response:
        if expected is not None:
            _check_bearer(request, expected.get_secret_value())
        elif not _is_loopback(client_address(request, services.trust)):
            # The series name every customer, so they are not for everyone
            # who can reach the registry.
            raise DeniedError(
                "/metrics responds only to clients on this machine; set metrics_token "
                "to scrape it from elsewhere"
            )
        audit = services.audit
        sink_drops = {sink.name: sink.dropped for sink in audit.sinks}
        await services.metrics.refresh(
            services.engine, audit.queue_depth(), audit.written, sink_drops
        )
        return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics, methods=["GET"])]


def _is_loopback(address: str | None) -> bool:
    if address is None:
        return False
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
        return parsed.ipv4_mapped.is_loopback
    return parsed.is_loopback


def _check_bearer(request: Request, expected: str) -> None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), expected.encode()
    ):
        raise MetricsTokenError
