"""Blobs: `GET`, `HEAD` (with Range) and `DELETE /v2/<name>/blobs/<digest>`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from moorage.api.http import parse_range
from moorage.api.oci.common import repository_name
from moorage.auth.access import DELETE, PULL
from moorage.digests import parse_digest
from moorage.errors import BlobUnknownError
from moorage.services import Services
from moorage.zerocopy import (
    ThreadedBodyResponse,
    ZeroCopyFileResponse,
    supports_zerocopy,
)


def routes(services: Services) -> list[Route]:
    registry = services.registry
    guard = services.guard

    async def get_blob(request: Request) -> Response:
        name = repository_name(request)
        digest = request.path_params["digest"]
        parse_digest(digest)
        # Recorded before the checks, so that a failed pull names the blob too.
        request.state.digest = digest
        access = await guard.authorize(request, name, [PULL])
        if not access.visible:
            raise BlobUnknownError(detail={"digest": digest})
        size = await registry.blob_size(name, digest)

        headers = {
            "Docker-Content-Digest": digest,
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
        }
        byte_range = parse_range(request.headers.get("range"), size)
        status = 200
        start, length = 0, size
        if byte_range is not None:
            status = 206
            start, length = byte_range.start, byte_range.length
            headers["Content-Range"] = byte_range.content_range(size)
        headers["Content-Length"] = str(length)

        if request.method == "HEAD":
            return Response(
                status_code=status,
                headers=headers,
                media_type="application/octet-stream",
            )
        request.state.bytes_sent = length
        if supports_zerocopy(request.scope):
            file = await registry.open_blob_file(digest)
            if file is not None:
                return ZeroCopyFileResponse(
                    file,
                    start,
                    length,
                    status_code=status,
                    headers=headers,
                    media_type="application/octet-stream",
                )
            reader = await registry.open_blob_reader(digest, start, length)
            if reader is not None:
                return ThreadedBodyResponse(
                    reader,
                    length,
                    status_code=status,
                    headers=headers,
                    media_type="application/octet-stream",
                )
        body = await registry.read_blob(digest, start, length)
        return StreamingResponse(
            body,
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    async def delete_blob(request: Request) -> Response:
        name = repository_name(request)
        digest = request.path_params["digest"]
        parse_digest(digest)
        access = await guard.authorize(request, name, [DELETE])
        if not access.visible:
            raise BlobUnknownError(detail={"digest": digest})
        await registry.delete_blob(name, digest)
        request.state.digest = digest
        return Response(status_code=202)

    path = "/v2/{name:path}/blobs/{digest}"
    return [
        Route(path, get_blob, methods=["GET", "HEAD"]),
        Route(path, delete_blob, methods=["DELETE"]),
    ]
