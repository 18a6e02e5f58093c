"""Encrypt, in the background, what an installation stored before encryption.

The same task moves data keys that only the installation key-encryption key
wraps (envelopes from before owner keys) to wraps under their owners' keys,
seals manifests that the database data key seals for their owners, and
records the paths of blobs stored before paths were recorded.
"""

from __future__ import annotations

import asyncio

import structlog

from moorage.db.registry_store import RegistryStore
from moorage.db.wipe import checkpoint_wal
from moorage.storage import paths
from moorage.storage.drivers.base import PathNotFoundError, StorageDriver
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.maintenance import (
    adopt_envelopes,
    encrypt_plaintext,
    record_object_paths,
)
from moorage.storage.encryption.manifests import reseal_manifests

log = structlog.get_logger(__name__)

# Pause between conversion passes while plaintext uploads are still open.
RECHECK_SECONDS = 300


def start_background_encryption(
    driver: StorageDriver, store: RegistryStore
) -> asyncio.Task[None] | None:
    """Start converting plaintext blobs and manifests when encryption is on."""
    if not isinstance(driver, EncryptedDriver) or not driver.encrypt_new:
        return None
    return asyncio.create_task(_convert(driver, store), name="encrypt-plaintext")


async def _convert(driver: EncryptedDriver, store: RegistryStore) -> None:
    """Convert what is stored in plaintext, and again while plaintext uploads last.

    Uploads begun before encryption was turned on continue in plaintext, and
    become plaintext blobs when they finish, so the conversion runs again
    until no such upload is left.
    """
    try:
        while True:
            if (await reseal_manifests(store)).resealed:
                # The old plaintext or differently sealed rows stay in SQLite's
                # -wal file, and in the main file's old pages, until then.
                await checkpoint_wal(store.engine)
            await record_object_paths(driver)
            await encrypt_plaintext(driver, paths.BLOBS_PREFIX)
            await adopt_envelopes(driver)
            if not await _plaintext_uploads_remain(driver):
                return
            await asyncio.sleep(RECHECK_SECONDS)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background encryption of stored blobs stopped")


async def _plaintext_uploads_remain(driver: EncryptedDriver) -> bool:
    for path in await driver.list(paths.UPLOADS_PREFIX):
        try:
            if await driver.read_header(path) is None:
                return True
        except PathNotFoundError:
            continue
    return False
