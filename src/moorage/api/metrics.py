"""`GET /metrics`: the Prometheus text format, optionally behind a bearer token."""

from __future__ import annotations

import hmac

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.errors import UnauthorizedError
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
        audit = services.audit
        await services.metrics.refresh(
            services.engine, audit.queue_depth(), audit.written
        )
        return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics, methods=["GET"])]


def _check_bearer(request: Request, expected: str) -> None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), expected.encode()
    ):
        raise MetricsTokenError
