"""Helpers shared by the OCI endpoint modules."""

from __future__ import annotations

from starlette.requests import Request

from moorage.names import validate_name


def repository_name(request: Request) -> str:
    """Return the validated repository name of the request and note it for the log."""
    name = validate_name(request.path_params["name"])
    request.state.repository = name
    return name
