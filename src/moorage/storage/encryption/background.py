"""Encrypt, in the background, what an installation stored before encryption."""

from __future__ import annotations

import asyncio

import structlog

from moorage.db.registry_store import RegistryStore
from moorage.storage import paths
from moorage.storage.drivers.base import StorageDriver
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.maintenance import encrypt_plaintext

log = structlog.get_logger(__name__)


def start_background_encryption(
    driver: StorageDriver, store: RegistryStore
) -> asyncio.Task[None] | None:
    """Start converting plaintext blobs and manifests when encryption is on."""
    if not isinstance(driver, EncryptedDriver) or not driver.encrypt_new:
        return None
    return asyncio.create_task(_convert(driver, store), name="encrypt-plaintext")


async def _convert(driver: EncryptedDriver, store: RegistryStore) -> None:
    try:
        manifests = await store.seal_plaintext_manifests()
        if manifests:
            log.info("plaintext manifests encrypted", count=manifests)
        await encrypt_plaintext(driver, paths.BLOBS_PREFIX)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background encryption of stored blobs stopped")
