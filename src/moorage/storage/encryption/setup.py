"""Build the keyring and the encrypting driver layer from the settings."""

from __future__ import annotations

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.config import Settings
from moorage.db.key_store import KeyStore
from moorage.db.wrap_store import WrapStore
from moorage.storage.drivers.base import StorageDriver
from moorage.storage.encryption.custody import DataKeyCustody, OwnerKeys
from moorage.storage.encryption.database import DatabaseCipher, open_database_cipher
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.keys import EnvKeyring, FileKeyring, Keyring

log = structlog.get_logger(__name__)


def open_keyring(settings: Settings) -> Keyring | None:
    """Open the configured keyring; return None when no key is configured."""
    source = settings.encryption_key_source
    if source == "env":
        if settings.encryption_key is None:
            if settings.encryption:
                raise ValueError(
                    "encryption_key_source is env but MOORAGE_ENCRYPTION_KEY is unset"
                )
            return None
        return EnvKeyring(
            settings.encryption_key.get_secret_value(),
            [key.get_secret_value() for key in settings.encryption_previous_keys],
        )
    if source == "pkcs11":
        from moorage.storage.encryption.pkcs11 import Pkcs11Keyring

        return Pkcs11Keyring.from_settings(settings)
    keyring = FileKeyring(settings.resolved_key_dir)
    if not settings.encryption and not keyring.key_ids():
        return None
    return keyring


def encrypting_layer(inner: StorageDriver, settings: Settings) -> StorageDriver:
    """Wrap `inner` so it encrypts new objects (when enabled) and reads old ones."""
    keyring = open_keyring(settings)
    if keyring is None:
        return inner
    if settings.encryption:
        # Fails early on a missing or unusable key; a new installation gets its
        # first key here.
        log.debug("key-encryption key ready", key_id=keyring.active().key_id)
        if isinstance(keyring, FileKeyring):
            _warn_when_keys_sit_with_data(settings)
    return EncryptedDriver(inner, keyring, encrypt_new=settings.encryption)


def attach_owner_keys(engine: AsyncEngine, driver: StorageDriver) -> None:
    """Wrap blob data keys per owner, with owner keys kept in the database."""
    if isinstance(driver, EncryptedDriver):
        driver.custody = DataKeyCustody(
            OwnerKeys(KeyStore(engine), driver.keyring), WrapStore(engine)
        )


async def database_codec(
    engine: AsyncEngine, driver: StorageDriver
) -> DatabaseCipher | None:
    """Open the cipher for manifest content when blobs are encrypted too."""
    if not isinstance(driver, EncryptedDriver):
        return None
    return await open_database_cipher(
        KeyStore(engine), driver.keyring, seal_new=driver.encrypt_new
    )


def _warn_when_keys_sit_with_data(settings: Settings) -> None:
    key_dir = settings.resolved_key_dir.resolve()
    data_dir = settings.data_dir.resolve()
    if key_dir == data_dir or data_dir in key_dir.parents:
        log.warning(
            "encryption keys are stored inside the data directory, so a copy of "
            "that directory can be decrypted; set encryption_key_dir to another "
            "disk, or use the env or pkcs11 key source",
            key_dir=str(key_dir),
        )
