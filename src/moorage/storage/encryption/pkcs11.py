"""Key-encryption keys in a hardware security module, through PKCS#11.

Each KEK is an AES-256 secret key object on the token, labelled
`moorage-kek-<id>`, created sensitive and not extractable: it never leaves the
module. Data keys are wrapped with CKM_AES_GCM on the token, the context
(object id) as additional authenticated data. The active key is the one with
the newest id, so `moorage key rotate` in one process and the server in another
agree without sharing anything but the token.

Tested against SoftHSM2; any PKCS#11 v2.40 module with CKM_AES_GCM should do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    NoSuchKey,
    NoSuchToken,
    PinIncorrect,
    PinLocked,
    PKCS11Error,
    UserAlreadyLoggedIn,
)
from pkcs11.mechanisms import GCMParams

from moorage.config import Settings
from moorage.storage.encryption.keys import (
    KeyEncryptionKey,
    KeyManagementError,
    Keyring,
    KeyUnavailableError,
    UnwrapError,
    new_key_id,
)

LABEL_PREFIX = "moorage-kek-"
_NONCE_BYTES = 12


class Pkcs11Key(KeyEncryptionKey):
    """An AES key on the token; wrapping and unwrapping happen inside it."""

    def __init__(self, key_id: str, key: Any, source: str) -> None:
        self.key_id = key_id
        self.source = source
        self._key = key

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._key.encrypt(
            data_key,
            mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(nonce, context),
        )
        return nonce + bytes(sealed)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return bytes(
                self._key.decrypt(
                    wrapped[_NONCE_BYTES:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(wrapped[:_NONCE_BYTES], context),
                )
            )
        except PKCS11Error:
            raise UnwrapError(self.key_id, self.source) from None


class Pkcs11Keyring(Keyring):
    """KEKs on one PKCS#11 token, opened with the user PIN."""

    def __init__(self, library: str, token_label: str, pin: str) -> None:
        if not pin:
            raise KeyManagementError(
                f"the PIN for PKCS#11 token {token_label!r} is empty; set "
                "pkcs11_pin (MOORAGE_PKCS11_PIN) to the token's user PIN"
            )
        module = _load_library(library)
        try:
            token = module.get_token(token_label=token_label)
        except NoSuchToken:
            raise KeyManagementError(
                f"PKCS#11 token {token_label!r} not found in {library}; set "
                "pkcs11_token to the label of an initialised token"
            ) from None
        except (PKCS11Error, RuntimeError) as error:
            raise KeyManagementError(
                f"cannot find PKCS#11 token {token_label!r} in {library}: "
                f"{_reason(error)}"
            ) from None
        self._session = _open_session(token, token_label, pin)
        self._token_label = token_label
        self._keys: dict[str, Pkcs11Key] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Pkcs11Keyring:
        if settings.pkcs11_library is None or settings.pkcs11_pin is None:
            raise KeyManagementError(
                "the pkcs11 key source needs pkcs11_library and pkcs11_pin"
            )
        return cls(
            settings.pkcs11_library,
            settings.pkcs11_token,
            settings.pkcs11_pin.get_secret_value(),
        )

    def describe(self) -> str:
        return f"PKCS#11 token {self._token_label!r}"

    def active(self) -> KeyEncryptionKey:
        # Asked for each new object, so a key made by another process is used
        # from its next object on (rotation relies on this).
        ids = self.key_ids()
        if not ids:
            return self.create()
        return self.get(ids[-1])

    def get(self, key_id: str) -> KeyEncryptionKey:
        key = self._keys.get(key_id)
        if key is not None:
            return key
        try:
            found = self._session.get_key(
                object_class=ObjectClass.SECRET_KEY,
                key_type=KeyType.AES,
                label=LABEL_PREFIX + key_id,
            )
        except NoSuchKey:
            raise KeyUnavailableError(key_id) from None
        key = Pkcs11Key(key_id, found, self.describe())
        self._keys[key_id] = key
        return key

    def create(self) -> KeyEncryptionKey:
        key_id = new_key_id("hsm")
        self._session.generate_key(
            KeyType.AES,
            256,
            label=LABEL_PREFIX + key_id,
            store=True,
            template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
            },
        )
        return self.get(key_id)

    def retire(self, key_id: str) -> None:
        if key_id == self.active().key_id:
            raise KeyManagementError("the active key-encryption key cannot be retired")
        try:
            found = self._session.get_key(
                object_class=ObjectClass.SECRET_KEY, label=LABEL_PREFIX + key_id
            )
        except NoSuchKey:
            return
        found.destroy()
        self._keys.pop(key_id, None)

    def key_ids(self) -> list[str]:
        labels = []
        for found in self._session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY}
        ):
            label = found.label or ""
            if label.startswith(LABEL_PREFIX):
                labels.append(label[len(LABEL_PREFIX) :])
        return sorted(labels)


def _load_library(library: str) -> Any:
    """Load the PKCS#11 module; raise KeyManagementError naming its path."""
    if not Path(library).is_file():
        raise KeyManagementError(
            f"PKCS#11 library {library} does not exist; set pkcs11_library to "
            "the path of the module's shared library"
        )
    try:
        return pkcs11.lib(library)
    except (PKCS11Error, RuntimeError) as error:
        raise KeyManagementError(
            f"PKCS#11 library {library} cannot be loaded: {_reason(error)}"
        ) from None


def _open_session(token: Any, token_label: str, pin: str) -> Any:
    """Open a read-write session, logged in as the user.

    A PKCS#11 login belongs to the whole process, so a second keyring in the
    same process opens its session without logging in again.
    """
    try:
        try:
            return token.open(user_pin=pin, rw=True)
        except UserAlreadyLoggedIn:
            return token.open(rw=True)
    except PinIncorrect:
        raise KeyManagementError(
            f"the PIN for PKCS#11 token {token_label!r} is incorrect; set "
            "pkcs11_pin (MOORAGE_PKCS11_PIN) to the token's user PIN. Tokens "
            "may lock the PIN after repeated failures"
        ) from None
    except PinLocked:
        raise KeyManagementError(
            f"the user PIN of PKCS#11 token {token_label!r} is locked; unlock it "
            "with the token's security officer PIN"
        ) from None
    except (PKCS11Error, RuntimeError) as error:
        raise KeyManagementError(
            f"cannot log in to PKCS#11 token {token_label!r}: {_reason(error)}"
        ) from None


def _reason(error: Exception) -> str:
    """Return the library's message, or the error's name when it has none."""
    return str(error) or type(error).__name__
