"""OCI error codes, their HTTP statuses, and the one handler that uses them.

Domain errors (`moorage.errors`) map to codes here and nowhere else. The JSON
envelope is the distribution spec's: {"errors": [{"code", "message", "detail"}]}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from moorage import errors


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str
    status: int


BLOB_UNKNOWN = ErrorCode("BLOB_UNKNOWN", 404)
BLOB_UPLOAD_INVALID = ErrorCode("BLOB_UPLOAD_INVALID", 400)
BLOB_UPLOAD_UNKNOWN = ErrorCode("BLOB_UPLOAD_UNKNOWN", 404)
DIGEST_INVALID = ErrorCode("DIGEST_INVALID", 400)
MANIFEST_BLOB_UNKNOWN = ErrorCode("MANIFEST_BLOB_UNKNOWN", 400)
MANIFEST_INVALID = ErrorCode("MANIFEST_INVALID", 400)
MANIFEST_UNKNOWN = ErrorCode("MANIFEST_UNKNOWN", 404)
NAME_INVALID = ErrorCode("NAME_INVALID", 400)
NAME_UNKNOWN = ErrorCode("NAME_UNKNOWN", 404)
SIZE_INVALID = ErrorCode("SIZE_INVALID", 400)
UNAUTHORIZED = ErrorCode("UNAUTHORIZED", 401)
DENIED = ErrorCode("DENIED", 403)
UNSUPPORTED = ErrorCode("UNSUPPORTED", 400)
TOOMANYREQUESTS = ErrorCode("TOOMANYREQUESTS", 429)
# Codes of the CNCF distribution registry that the OCI table lacks.
TAG_INVALID = ErrorCode("TAG_INVALID", 400)
PAGINATION_NUMBER_INVALID = ErrorCode("PAGINATION_NUMBER_INVALID", 400)
RANGE_INVALID = ErrorCode("RANGE_INVALID", 416)
MANIFEST_TOO_LARGE = ErrorCode("SIZE_INVALID", 413)
METHOD_NOT_ALLOWED = ErrorCode("UNSUPPORTED", 405)
NOT_FOUND = ErrorCode("NOT_FOUND", 404)
CONFLICT = ErrorCode("CONFLICT", 409)
LAST_OWNER = ErrorCode("LAST_OWNER", 409)
INVALID_INPUT = ErrorCode("INVALID_INPUT", 400)
UNKNOWN = ErrorCode("UNKNOWN", 500)

ERROR_CODES: dict[type[errors.MoorageError], ErrorCode] = {
    errors.BlobUnknownError: BLOB_UNKNOWN,
    # The CNCF distribution registry answers 405 when it may not delete a blob.
    errors.BlobReferencedError: METHOD_NOT_ALLOWED,
    errors.UploadInvalidError: BLOB_UPLOAD_INVALID,
    errors.UploadUnknownError: BLOB_UPLOAD_UNKNOWN,
    errors.DigestInvalidError: DIGEST_INVALID,
    errors.ManifestBlobUnknownError: MANIFEST_BLOB_UNKNOWN,
    errors.ManifestInvalidError: MANIFEST_INVALID,
    errors.ManifestUnknownError: MANIFEST_UNKNOWN,
    errors.ManifestTooLargeError: MANIFEST_TOO_LARGE,
    errors.NameInvalidError: NAME_INVALID,
    errors.NameUnknownError: NAME_UNKNOWN,
    errors.SizeInvalidError: SIZE_INVALID,
    errors.UnauthorizedError: UNAUTHORIZED,
    errors.DeniedError: DENIED,
    errors.TooManyRequestsError: TOOMANYREQUESTS,
    errors.UnsupportedError: UNSUPPORTED,
    errors.TagInvalidError: TAG_INVALID,
    errors.PaginationInvalidError: PAGINATION_NUMBER_INVALID,
    errors.RangeInvalidError: RANGE_INVALID,
    errors.ConflictError: CONFLICT,
    errors.LastOwnerError: LAST_OWNER,
    errors.InvalidInputError: INVALID_INPUT,
    errors.NotFoundError: NOT_FOUND,
}


def code_for(error: errors.MoorageError) -> ErrorCode:
    for cls in type(error).__mro__:
        found = ERROR_CODES.get(cls)  # type: ignore[call-overload]
        if found is not None:
            return found
    return UNKNOWN


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}, separators=(",", ":")).encode()


def error_response(
    error: errors.MoorageError, headers: dict[str, str] | None = None
) -> Response:
    """Build the spec's JSON error response for a domain error: one entry per
    problem of an InvalidInputError that found several."""
    code = code_for(error)
    body = error_body(code.code, error.message, error.detail)
    if isinstance(error, errors.InvalidInputError) and len(error.problems) > 1:
        entries = [{"code": code.code, "message": item} for item in error.problems]
        body = json.dumps({"errors": entries}, separators=(",", ":")).encode()
    return Response(
        body,
        status_code=code.status,
        headers=headers,
        media_type="application/json",
    )


async def handle_domain_error(request: Request, error: Exception) -> Response:
    """Starlette exception handler for every MoorageError."""
    assert isinstance(error, errors.MoorageError)
    request.state.error_code = code_for(error).code
    if error.audited:
        request.state.failure_audited = True
    headers = dict(getattr(error, "headers", None) or {})
    if isinstance(error, errors.RangeInvalidError) and error.size is not None:
        headers.setdefault("Content-Range", f"bytes */{error.size}")
    return error_response(error, headers)
