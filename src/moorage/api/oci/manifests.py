"""Manifests: `GET`, `HEAD`, `PUT`, `DELETE /v2/<name>/manifests/<reference>`.

The bytes a client pushed are stored and served unchanged; a manifest is never
converted to another format, so `Accept` only decides whether it is served.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.api.http import read_limited
from moorage.api.oci.common import repository_name
from moorage.auth.access import DELETE, PULL, PUSH
from moorage.digests import is_digest, parse_digest
from moorage.errors import (
    DeniedError,
    ManifestTooLargeError,
    ManifestUnknownError,
    TagInvalidError,
)
from moorage.names import validate_tag
from moorage.services import Services


def acceptable(media_type: str, accept_headers: list[str]) -> bool:
    """Tell whether any Accept header admits `media_type` (no header admits all)."""
    ranges = [
        part.split(";", 1)[0].strip()
        for header in accept_headers
        for part in header.split(",")
        if part.strip()
    ]
    if not ranges:
        return True
    major = media_type.split("/", 1)[0]
    return any(entry in (media_type, "*/*", f"{major}/*") for entry in ranges)


def _validate_reference(reference: str) -> None:
    """Reject a malformed digest (400); an invalid tag is one that cannot exist.

    The conformance suite expects 404 MANIFEST_UNKNOWN for a GET, HEAD or DELETE
    of a tag that breaks the grammar; a PUT of one gets 400 TAG_INVALID instead.
    """
    if is_digest(reference):
        parse_digest(reference)
        return
    try:
        validate_tag(reference)
    except TagInvalidError:
        raise ManifestUnknownError(detail={"reference": reference[:200]}) from None


def routes(services: Services) -> list[Route]:
    registry = services.registry
    guard = services.guard
    limit = services.settings.max_manifest_bytes

    async def get_manifest(request: Request) -> Response:
        name = repository_name(request)
        reference = request.path_params["reference"]
        request.state.reference = reference
        _validate_reference(reference)
        access = await guard.authorize(request, name, [PULL])
        if not access.visible:
            raise ManifestUnknownError(detail={"reference": reference})
        manifest = await registry.get_manifest(name, reference)
        if not acceptable(manifest.media_type, request.headers.getlist("accept")):
            raise ManifestUnknownError(
                f"manifest is {manifest.media_type}, which the Accept header excludes",
                detail={"reference": reference},
            )
        request.state.digest = manifest.digest
        headers = {
            "Docker-Content-Digest": manifest.digest,
            "ETag": f'"{manifest.digest}"',
            "Content-Length": str(manifest.size),
        }
        body = b"" if request.method == "HEAD" else manifest.content
        return Response(body, headers=headers, media_type=manifest.media_type)

    async def put_manifest(request: Request) -> Response:
        name = repository_name(request)
        reference = request.path_params["reference"]
        request.state.reference = reference
        if is_digest(reference):
            parse_digest(reference)
        else:
            validate_tag(reference)
        access = await guard.authorize(request, name, [PULL, PUSH])
        if not access.visible:
            raise DeniedError(f"requested access to the resource is denied: {name}")
        body = await read_limited(request, limit)
        if body is None:
            raise ManifestTooLargeError(
                f"manifest is larger than the limit of {limit} bytes",
                detail={"limit": limit},
            )
        stored = await registry.put_manifest(
            name, reference, request.headers.get("content-type"), body
        )
        request.state.digest = stored.digest
        request.state.bytes_received = len(body)
        headers = {
            "Location": f"/v2/{name}/manifests/{stored.digest}",
            "Docker-Content-Digest": stored.digest,
        }
        if stored.subject:
            headers["OCI-Subject"] = stored.subject
        return Response(status_code=201, headers=headers)

    async def delete_manifest(request: Request) -> Response:
        name = repository_name(request)
        reference = request.path_params["reference"]
        request.state.reference = reference
        _validate_reference(reference)
        access = await guard.authorize(request, name, [DELETE])
        if not access.visible:
            raise ManifestUnknownError(detail={"reference": reference})
        await registry.delete_manifest(name, reference)
        return Response(status_code=202)

    path = "/v2/{name:path}/manifests/{reference}"
    return [
        Route(path, get_manifest, methods=["GET", "HEAD"]),
        Route(path, put_manifest, methods=["PUT"]),
        Route(path, delete_manifest, methods=["DELETE"]),
    ]
