"""Storage drivers: where bytes live. See `base.StorageDriver` for the contract."""

from moorage.storage.drivers.base import (
    FileInfo,
    FileWriter,
    PathNotFoundError,
    StorageDriver,
)

__all__ = ["FileInfo", "FileWriter", "PathNotFoundError", "StorageDriver"]
