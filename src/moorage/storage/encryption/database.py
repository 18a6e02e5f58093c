"""Encryption of data kept in the database under one key: signing and server keys.

One data key, wrapped by the key-encryption key, protects them; its wrapped
form lives in the `sealed_keys` table, so rotation rewraps one row. Each value
is sealed with AES-256-GCM under a random nonce, with a context (a key's name,
a manifest's digest) as the associated data, so content moved to another row
does not decrypt.

Manifest rows stored before owner keys were sealed with this key too.
`manifests.ManifestCipher` reads them through it until they are sealed for
their owners. Rows written before encryption was on have no prefix and are
returned as they are.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moorage.db.key_store import KeyStore
from moorage.storage.encryption.driver import IntegrityHook, log_integrity_error
from moorage.storage.encryption.format import DATA_KEY_BYTES, IntegrityError
from moorage.storage.encryption.keys import Keyring

DATABASE_KEY = "database"
MAGIC = b"MRGDB1\x00"
_NONCE_BYTES = 12


def wrap_context(name: str) -> bytes:
    return b"moorage-database-key:" + name.encode()


class DatabaseCipher:
    """Seals and opens values under the database data key (a `ContentCodec`)."""

    def __init__(
        self,
        data_key: bytes,
        *,
        seal_new: bool = True,
        on_integrity_error: IntegrityHook = log_integrity_error,
    ) -> None:
        self._aead = AESGCM(data_key)
        self.seal_new = seal_new
        self.on_integrity_error = on_integrity_error

    def seal(self, content: bytes, digest: str) -> bytes:
        if not self.seal_new:
            return content
        nonce = os.urandom(_NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, content, digest.encode())

    def is_sealed(self, stored: bytes) -> bool:
        return is_sealed(stored)

    def open(self, stored: bytes, digest: str) -> bytes:
        if not is_sealed(stored):
            return stored
        start = len(MAGIC)
        nonce = stored[start : start + _NONCE_BYTES]
        try:
            return self._aead.decrypt(
                nonce, stored[start + _NONCE_BYTES :], digest.encode()
            )
        except InvalidTag:
            error = IntegrityError(
                f"manifest {digest}", "content does not authenticate"
            )
            self.on_integrity_error(error)
            raise error from None


def is_sealed(stored: bytes) -> bool:
    return stored.startswith(MAGIC)


async def open_database_cipher(
    store: KeyStore, keyring: Keyring, *, seal_new: bool = True
) -> DatabaseCipher:
    """Load the database data key, creating it on first use."""
    kek = keyring.active()
    context = wrap_context(DATABASE_KEY)
    candidate = kek.wrap(os.urandom(DATA_KEY_BYTES), context)
    stored = await store.get_or_add(DATABASE_KEY, kek.key_id, candidate)
    data_key = keyring.get(stored.key_id).unwrap(stored.wrapped, context)
    return DatabaseCipher(data_key, seal_new=seal_new)


async def rewrap_database_keys(store: KeyStore, keyring: Keyring) -> int:
    """Wrap every database data key under the active KEK; return how many moved."""
    active = keyring.active()
    moved = 0
    for sealed in await store.list():
        if sealed.key_id == active.key_id:
            continue
        context = wrap_context(sealed.name)
        data_key = keyring.get(sealed.key_id).unwrap(sealed.wrapped, context)
        if await store.replace(sealed, active.key_id, active.wrap(data_key, context)):
            moved += 1
    return moved
