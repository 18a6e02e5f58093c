"""Blob uploads under `/v2/<name>/blobs/uploads/`.

POST                 start a session; or whole blob with ?digest=; or
                     ?mount=<digest>&from=<repository> to link an existing blob
PATCH <id>           append a chunk (streamed, or with Content-Range)
PUT <id>?digest=     append an optional last chunk (with Content-Range or
                     not), verify, commit
GET <id>             report progress (204 with Range)
DELETE <id>          cancel
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from moorage.api.access import Access
from moorage.api.http import content_length, has_body, parse_content_range, upload_range
from moorage.api.oci.common import repository_name
from moorage.auth.access import PULL, PUSH
from moorage.db.registry_store import UploadRecord
from moorage.db.schema import utcnow
from moorage.digests import parse_digest
from moorage.errors import (
    DeniedError,
    DigestInvalidError,
    NameInvalidError,
    RangeInvalidError,
    SizeInvalidError,
    UploadUnknownError,
)
from moorage.names import validate_name
from moorage.services import Services


def _session_headers(name: str, upload: UploadRecord) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload.id}",
        "Range": upload_range(upload.size),
        "Docker-Upload-UUID": upload.id,
    }


def _blob_headers(name: str, digest: str) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/{digest}",
        "Docker-Content-Digest": digest,
    }


def routes(services: Services) -> list[Route]:
    registry = services.registry
    guard = services.guard

    async def authorize_push(
        request: Request, name: str, mount_source: str | None = None
    ) -> Access:
        access = await guard.authorize(
            request, name, [PULL, PUSH], mount_source=mount_source
        )
        if not access.visible:
            raise DeniedError(f"requested access to the resource is denied: {name}")
        return access

    async def start(request: Request) -> Response:
        name = repository_name(request)
        mount = request.query_params.get("mount")
        access = await authorize_push(request, name, _mount_source(request))
        digest = request.query_params.get("digest")

        if mount is not None:
            size = await try_mount(request, access, name, mount)
            if size is not None:
                request.state.digest = mount
                request.state.mounted = True
                return Response(status_code=201, headers=_blob_headers(name, mount))
        elif digest is not None:
            parse_digest(digest)
            size = await registry.upload_whole(
                name, digest, request.stream(), content_length(request)
            )
            request.state.digest = digest
            request.state.bytes_received = size
            return Response(status_code=201, headers=_blob_headers(name, digest))

        upload = await registry.start_upload(name)
        request.state.upload_id = upload.id
        return Response(status_code=202, headers=_session_headers(name, upload))

    async def try_mount(
        request: Request, access: Access, name: str, digest: str
    ) -> int | None:
        """Mount from `from` when the caller may pull there; None starts a session."""
        parse_digest(digest)
        source = _mount_source(request)
        if source is None:
            return None
        caller = access.caller
        if PULL not in caller.principal.actions_on(source, utcnow()):
            return None
        if not caller.token_allows("repository", source, PULL):
            return None
        return await registry.mount_blob(name, source, digest)

    async def append(request: Request) -> Response:
        name = repository_name(request)
        upload_id = request.path_params["upload_id"]
        request.state.upload_id = upload_id
        await authorize_push(request, name)
        length = content_length(request)
        start = _chunk_start(request, length)
        try:
            upload = await registry.append(
                name, upload_id, request.stream(), start=start, length=length
            )
        except RangeInvalidError as error:
            await add_session_headers(error, name, upload_id)
            raise
        return Response(status_code=202, headers=_session_headers(name, upload))

    async def finish(request: Request) -> Response:
        name = repository_name(request)
        upload_id = request.path_params["upload_id"]
        request.state.upload_id = upload_id
        await authorize_push(request, name)
        digest = request.query_params.get("digest")
        if not digest:
            raise DigestInvalidError("the digest query parameter is required")
        parse_digest(digest)
        body = None
        length = None
        start = None
        if has_body(request):
            body = request.stream()
            length = content_length(request)
            start = _chunk_start(request, length)
        try:
            size = await registry.finish_upload(
                name, upload_id, digest, body, length, start=start
            )
        except RangeInvalidError as error:
            await add_session_headers(error, name, upload_id)
            raise
        request.state.digest = digest
        request.state.bytes_received = size
        return Response(status_code=201, headers=_blob_headers(name, digest))

    async def add_session_headers(
        error: RangeInvalidError, name: str, upload_id: str
    ) -> None:
        """Add the session's Location and Range headers to a chunk's 416 error."""
        current = await registry.get_upload(name, upload_id)
        error.headers = _session_headers(name, current)  # type: ignore[attr-defined]
        error.size = None

    async def status(request: Request) -> Response:
        name = repository_name(request)
        upload_id = request.path_params["upload_id"]
        access = await guard.authorize(request, name, [PULL])
        if not access.visible:
            raise UploadUnknownError(detail={"upload": upload_id[:100]})
        upload = await registry.get_upload(name, upload_id)
        return Response(status_code=204, headers=_session_headers(name, upload))

    async def cancel(request: Request) -> Response:
        name = repository_name(request)
        upload_id = request.path_params["upload_id"]
        request.state.upload_id = upload_id
        await authorize_push(request, name)
        await registry.cancel_upload(name, upload_id)
        return Response(status_code=204)

    session = "/v2/{name:path}/blobs/uploads/{upload_id}"
    return [
        Route("/v2/{name:path}/blobs/uploads/", start, methods=["POST"]),
        Route(session, append, methods=["PATCH"]),
        Route(session, finish, methods=["PUT"]),
        Route(session, status, methods=["GET"]),
        Route(session, cancel, methods=["DELETE"]),
    ]


def _chunk_start(request: Request, length: int | None) -> int | None:
    """Return the first offset of a chunk sent with Content-Range, if any.

    Raises SizeInvalidError when Content-Length disagrees with the range.
    """
    chunk = parse_content_range(request.headers.get("content-range"))
    if chunk is None:
        return None
    first, last = chunk
    if length is not None and length != last - first + 1:
        raise SizeInvalidError(
            f"Content-Length {length} does not match Content-Range {first}-{last}"
        )
    return first


def _mount_source(request: Request) -> str | None:
    """Return the valid `from` repository of a mount request, if there is one."""
    if request.query_params.get("mount") is None:
        return None
    source = request.query_params.get("from")
    if not source:
        return None
    try:
        return validate_name(source)
    except NameInvalidError:
        return None
