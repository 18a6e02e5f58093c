"""The customer portal: one HTML page at `/portal` with its script and styles.

The page calls the admin API (`/api/v1`) from the browser with HTTP Basic
credentials that the script keeps in memory only, so there is no cookie and
no session to forge. Every change it makes (a robot secret, a password, a
personal access token) goes through an audited endpoint of the admin API or
`PUT /account/password`.

The responses carry a Content-Security-Policy that allows scripts, styles and
requests from this server only and no inline script, so that text from
customers that reaches the page cannot run as code. The script writes data
with `textContent` only.
"""

from __future__ import annotations

import html
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.api.errors import NOT_FOUND, error_body
from moorage.api.http import base_url
from moorage.services import Services

PAGE_PATH = "/portal"
# The page's own files, each with its media type.
ASSETS = {
    "portal.js": "text/javascript; charset=utf-8",
    "portal.css": "text/css; charset=utf-8",
    # Declared in the page, so that browsers do not request /favicon.ico.
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Replaced in portal.html by the registry's address, HTML-escaped.
REGISTRY_PLACEHOLDER = "{{registry}}"


def _read(name: str) -> str:
    return (files(__package__) / name).read_text(encoding="utf-8")


def routes(services: Services) -> list[Route]:
    template = _read("portal.html")
    assets = {name: _read(name).encode() for name in ASSETS}

    async def portal_page(request: Request) -> Response:
        # The page shows commands with this address, so it follows public_url
        # and trusted proxies as the token realm does.
        registry = base_url(request, services.settings, services.trust)
        page = template.replace(REGISTRY_PLACEHOLDER, html.escape(registry))
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        return Response(page, media_type="text/html", headers=headers)

    async def portal_asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            body = error_body(NOT_FOUND.code, "page not found")
            return Response(body, status_code=404, media_type="application/json")
        return Response(
            assets[name],
            headers={**SECURITY_HEADERS, "Content-Type": ASSETS[name]},
        )

    return [
        Route(PAGE_PATH, portal_page, methods=["GET"]),
        Route(f"{PAGE_PATH}/{{name}}", portal_asset, methods=["GET"]),
    ]
