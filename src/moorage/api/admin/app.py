"""Build the admin API: a FastAPI application mounted at `/api/v1`.

Errors use the registry's JSON envelope, `{"errors": [{"code", "message"}]}`.
Domain errors map through the same table as in the registry API. Invalid
request bodies and parameters get 400 `INVALID_INPUT`, one entry per problem
with the value and the fix; names, roles, patterns and times that
`moorage.admin` rejects are likewise listed together, one entry each. Unknown
paths get 404, unexpected failures 500 `UNKNOWN`. The OpenAPI document is
`/api/v1/openapi.json`, browsable at `/api/v1/docs`; both need no login because
they describe no customer's data.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moorage.api.admin import accounts, customers, grants, me, repositories
from moorage.api.admin.models import check_text
from moorage.api.errors import (
    INVALID_INPUT,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    SIZE_INVALID,
    UNKNOWN,
    ErrorCode,
    handle_domain_error,
)
from moorage.errors import MoorageError
from moorage.services import Services

# Request bodies are small JSON documents; anything larger is rejected unread.
MAX_BODY_BYTES = 64 * 1024
# Fixes for the most common validation problems, by pydantic error type.
_FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it",
    "json_invalid": "send a JSON document",
    "model_attributes_type": "send a JSON object",
    "timezone_aware": "add a zone, for example 2027-06-30T00:00:00Z",
}
BODY_TOO_LARGE = ErrorCode(SIZE_INVALID.code, 413)
_STATUS_CODES = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 413: BODY_TOO_LARGE}
# Where the /docs page's Swagger UI files are served, under the API's prefix.
DOCS_ASSETS = "/docs/assets"
# Every router of the API; the authorization matrix test walks their routes.
ROUTERS = (
    me.router,
    repositories.router,
    customers.router,
    accounts.router,
    grants.router,
)


def create_admin_api(services: Services) -> FastAPI:
    api = FastAPI(
        title="Moorage admin API",
        version="1",
        summary="Manage customers' users, robots and grants, and your own tokens.",
        openapi_url="/openapi.json",
        # /docs is added below, with Swagger UI's files served from here.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        dependencies=[Depends(check_path_text)],
        exception_handlers={
            MoorageError: handle_domain_error,
            RequestValidationError: _invalid_request,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    api.state.services = services
    api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    for router in ROUTERS:
        api.include_router(router)
    swagger_ui = StaticFiles(directory=str(files("fastapi_offline") / "static"))
    api.mount(DOCS_ASSETS, swagger_ui, name="docs_assets")
    api.add_api_route("/docs", _docs_page, include_in_schema=False)
    return api


async def _docs_page(request: Request) -> Response:
    """Serve the Swagger UI page for the OpenAPI document, with its scripts and
    styles from this server, so that it works without internet access."""
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="Moorage admin API",
        swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
    )


def check_path_text(request: Request) -> None:
    """Reject a path parameter with a control character (from %00 and the
    like) with 400, before any route looks it up in the database."""
    problems = []
    for name, value in request.path_params.items():
        try:
            check_text(str(value))
        except ValueError as error:
            problems.append(
                {
                    "type": "value_error",
                    "loc": ("path", name),
                    "msg": str(error),
                    "input": value,
                }
            )
    if problems:
        raise RequestValidationError(problems)


def _json_error(
    request: Request, code: ErrorCode, messages: list[str], headers: Any = None
) -> Response:
    request.state.error_code = code.code
    return Response(
        _envelope(code.code, messages),
        status_code=code.status,
        headers=headers,
        media_type="application/json",
    )


def _envelope(code: str, messages: list[str]) -> bytes:
    entries = [{"code": code, "message": message} for message in messages]
    return json.dumps({"errors": entries}, separators=(",", ":")).encode()


def describe_problem(problem: dict[str, Any]) -> str:
    """Describe one pydantic validation problem: where, what, the value, the fix."""
    where = ".".join(str(part) for part in problem.get("loc", ())) or "request"
    message = f"invalid {where}: {problem.get('msg', 'invalid value')}"
    kind = problem.get("type", "")
    if kind not in ("missing", "json_invalid") and "input" in problem:
        message += f" (got {problem['input']!r:.100})"
    fix = _FIXES.get(kind)
    return f"{message}; {fix}" if fix else message


async def _invalid_request(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    messages = [describe_problem(problem) for problem in error.errors()]
    return _json_error(request, INVALID_INPUT, messages or ["invalid request"])


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    code = _STATUS_CODES.get(error.status_code)
    if code is None:
        code = ErrorCode(INVALID_INPUT.code, error.status_code)
    messages = {404: "page not found", 405: "method not allowed"}
    message = messages.get(error.status_code, str(error.detail))
    return _json_error(request, code, [message], error.headers)


async def _unexpected_error(request: Request, error: Exception) -> Response:
    # The request middleware logs the traceback once, when the error reaches it.
    return _json_error(request, UNKNOWN, ["internal server error; see the server log"])


class BodyLimit:
    """Rejects request bodies over `limit` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Request(scope).headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            too_large = HTTPException(413, self._message())
            response = await _http_error(Request(scope), too_large)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body is larger than {self.limit} bytes: send less"
