"""Domain errors raised by the registry, storage and auth layers.

The API layer maps each class to an OCI error code and HTTP status in one table
(`moorage.api.errors`); code below the API never picks a status itself.

    MoorageError
    ├── NameInvalidError, TagInvalidError, DigestInvalidError
    ├── NameUnknownError, BlobUnknownError, ManifestUnknownError, UploadUnknownError
    ├── BlobReferencedError
    ├── ManifestInvalidError, ManifestBlobUnknownError, ManifestTooLargeError
    ├── UploadInvalidError, RangeInvalidError, SizeInvalidError
    ├── PaginationInvalidError, UnsupportedError
    ├── UnauthorizedError, DeniedError, TooManyRequestsError
    ├── InvalidInputError (administrative input: a bad name, role or password)
    ├── BackupError (a backup cannot be made, read or restored)
    └── ConflictError (administrative changes: a name already taken)
        └── LastOwnerError (a change would leave nobody to manage a customer)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class MoorageError(Exception):
    """Base class of every error Moorage raises on purpose."""

    def __init__(self, message: str | None = None, detail: Any = None) -> None:
        super().__init__(message or self.__doc__ or type(self).__name__)
        self.message = message or (self.__doc__ or "").strip()
        self.detail = detail
        # Set once an audit event records this error, so that the request's
        # observer does not record the same failure again.
        self.audited = False


class NameInvalidError(MoorageError):
    """invalid repository name"""


class TagInvalidError(MoorageError):
    """invalid tag"""


class DigestInvalidError(MoorageError):
    """provided digest did not match uploaded content"""


class NameUnknownError(MoorageError):
    """repository name not known to registry"""


class BlobUnknownError(MoorageError):
    """blob unknown to registry"""


class BlobReferencedError(MoorageError):
    """blob is referenced by a manifest in this repository"""


class ManifestUnknownError(MoorageError):
    """manifest unknown"""


class UploadUnknownError(MoorageError):
    """blob upload unknown to registry"""


class ManifestInvalidError(MoorageError):
    """manifest invalid"""


class ManifestBlobUnknownError(MoorageError):
    """manifest references a blob or manifest unknown to this repository"""


class ManifestTooLargeError(MoorageError):
    """manifest too large"""


class UploadInvalidError(MoorageError):
    """blob upload invalid"""


class RangeInvalidError(MoorageError):
    """requested range not satisfiable"""

    def __init__(
        self, message: str | None = None, detail: Any = None, *, size: int | None = None
    ) -> None:
        super().__init__(message, detail)
        self.size = size


class SizeInvalidError(MoorageError):
    """provided length did not match content length"""


class PaginationInvalidError(MoorageError):
    """invalid number of results requested"""


class UnsupportedError(MoorageError):
    """the operation is unsupported"""


class UnauthorizedError(MoorageError):
    """authentication required"""

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        *,
        reason: str | None = None,
        customer: str | None = None,
        login: str | None = None,
    ) -> None:
        """Keep `reason`, `customer` and `login` for the audit trail only, never
        sent. `reason` is more exact than the message, which must not help a
        guesser. `customer` and `login` name the account of authentic
        credentials, such as a signed token."""
        super().__init__(message, detail)
        self.reason = reason or self.message
        self.customer = customer
        self.login = login


class DeniedError(MoorageError):
    """requested access to the resource is denied"""


class TooManyRequestsError(MoorageError):
    """too many requests"""

    def __init__(
        self, message: str | None = None, detail: Any = None, *, retry_after: int = 1
    ) -> None:
        super().__init__(message, detail)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}
        # For the audit trail only, never sent: the customer of the account
        # that a throttled login names, when known (see Authenticator.login).
        self.customer: str | None = None


class InvalidInputError(MoorageError):
    """invalid input"""

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        *,
        problems: Sequence[str] = (),
    ) -> None:
        super().__init__(message or "; ".join(problems) or None, detail)
        # One message per invalid value, when a check found several at once.
        self.problems = list(problems) or [self.message]


class ConflictError(MoorageError):
    """the name is already taken"""


class LastOwnerError(ConflictError):
    """the change would leave a customer without an active owner, or the
    installation without an active vendor admin"""


class NotFoundError(MoorageError):
    """not found"""


class BackupError(MoorageError):
    """the backup could not be made, read or restored"""
