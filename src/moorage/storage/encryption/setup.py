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
from moorage.storage.encryption.keys import (
    EnvKeyring,
    FileKeyring,
    KeyManagementError,
    Keyring,
)
from moorage.storage.encryption.manifests import ManifestCipher

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


class MissingKeysError(KeyManagementError):
    """The database contains keys wrapped by key-encryption keys that are missing."""

    def __init__(self, key_ids: list[str], settings: Settings) -> None:
        where, remedy = _key_source_help(settings)
        super().__init__(
            f"key-encryption key {', '.join(key_ids)} not found in {where}, but the "
            f"database holds keys wrapped by it; {remedy}. No new key was created"
        )
        self.key_ids = key_ids


def _key_source_help(settings: Settings) -> tuple[str, str]:
    """Return where the configured source looks for keys, and how to restore one."""
    source = settings.encryption_key_source
    if source == "env":
        return (
            "MOORAGE_ENCRYPTION_KEY or MOORAGE_ENCRYPTION_PREVIOUS_KEYS",
            "set one of them to the key from the backup of this installation",
        )
    if source == "pkcs11":
        return (
            f"PKCS#11 token {settings.pkcs11_token!r}",
            "restore the key to the token from the module's backup",
        )
    return (
        f"the key directory {settings.resolved_key_dir.resolve()}",
        "restore its key files from the backup of this installation, or set "
        "encryption_key_dir to where they are",
    )


async def encrypting_layer(
    inner: StorageDriver, settings: Settings, sealed: KeyStore, keyring: Keyring | None
) -> StorageDriver:
    """Wrap `inner` so it encrypts new objects (when enabled) and reads old ones,
    with `keyring` from `open_keyring`.

    Raises MissingKeysError, before any key is created, when the database
    contains keys wrapped by key-encryption keys that the keyring lacks: a data
    directory restored without its keys.
    """
    stored = {key.key_id for key in await sealed.list()}
    missing = sorted(stored - set(keyring.key_ids() if keyring else []))
    if missing:
        raise MissingKeysError(missing, settings)
    if keyring is None:
        return inner
    if settings.encryption:
        # Fails early on a missing or unusable key; a new installation gets its
        # first key here.
        log.debug("key-encryption key ready", key_id=keyring.active().key_id)
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
    """Open the cipher of the database data key when blobs are encrypted too."""
    if not isinstance(driver, EncryptedDriver):
        return None
    return await open_database_cipher(
        KeyStore(engine), driver.keyring, seal_new=driver.encrypt_new
    )


def manifest_codec(
    driver: StorageDriver, database: DatabaseCipher | None
) -> ManifestCipher | None:
    """Open the cipher that seals manifest content for each repository's owner."""
    if not isinstance(driver, EncryptedDriver) or driver.custody is None:
        return None
    assert database is not None
    return ManifestCipher(driver.custody, database, seal_new=database.seal_new)


def keys_inside_data_dir(settings: Settings) -> bool:
    """Return whether new data is encrypted under key files in the data directory,
    so that a copy of that directory can be decrypted."""
    if not settings.encryption or settings.encryption_key_source != "file":
        return False
    key_dir = settings.resolved_key_dir.resolve()
    data_dir = settings.data_dir.resolve()
    return key_dir == data_dir or data_dir in key_dir.parents
