"""Key-encryption keys (KEKs): where they live and how they wrap data keys.

A `Keyring` contains every KEK that still wraps a data key, by id, and names the
active one, which wraps new data keys. Three keyrings come with Moorage:

- `FileKeyring`: one file per KEK in a directory, and an `active` file naming the
  active KEK. `moorage key rotate` adds a file; the server notices the new
  `active` file without a restart.
- `EnvKeyring`: the KEK in `MOORAGE_ENCRYPTION_KEY`, earlier ones in
  `MOORAGE_ENCRYPTION_PREVIOUS_KEYS`.
- `moorage.storage.encryption.pkcs11.Pkcs11Keyring`: AES keys that never leave a
  hardware security module.

A plug-in for another key manager (Vault transit, a cloud KMS) implements
`Keyring` and `KeyEncryptionKey`: `wrap` and `unwrap` a 32-byte data key with
a context that must match, and `create` a new active key for rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moorage.errors import MoorageError

log = structlog.get_logger(__name__)

KEK_BYTES = 32
_NONCE_BYTES = 12


class KeyManagementError(MoorageError):
    """A key-encryption key cannot be created, found or used."""


class KeyUnavailableError(KeyManagementError):
    """A data key is wrapped by a key-encryption key this keyring does not hold."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"key-encryption key {key_id!r} is not available; data wrapped by it "
            "cannot be read until the key is restored"
        )
        self.key_id = key_id


class UnwrapError(KeyManagementError):
    """A wrapped data key does not authenticate under its key-encryption key."""

    def __init__(self, key_id: str, source: str) -> None:
        super().__init__(
            f"key-encryption key {key_id} from {source} is not the key the data "
            "was sealed with: a data key wrapped under that id does not "
            "authenticate (or its stored wrap is damaged). Restore the key from "
            "the backup of this installation"
        )
        self.key_id = key_id


class KeyEncryptionKey(ABC):
    """One KEK: wraps and unwraps data keys, bound to a context."""

    key_id: str

    @abstractmethod
    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt `data_key`; `context` must be given again to unwrap it."""

    @abstractmethod
    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt a wrapped data key; raise UnwrapError when it does not match."""


class Keyring(ABC):
    """Every KEK that may wrap a stored data key, and the active one."""

    # Where the operator removes a KEK that rotation left unused, for keyrings
    # whose `retire` cannot remove it; None when `retire` does.
    retired_by_operator: str | None = None

    @abstractmethod
    def active(self) -> KeyEncryptionKey:
        """Return the KEK that wraps new data keys."""

    @abstractmethod
    def get(self, key_id: str) -> KeyEncryptionKey:
        """Return the KEK with this id, or raise KeyUnavailableError."""

    @abstractmethod
    def create(self) -> KeyEncryptionKey:
        """Add a new KEK and make it the active one (the first step of rotation)."""

    @abstractmethod
    def retire(self, key_id: str) -> None:
        """Remove a KEK that no longer wraps anything."""

    @abstractmethod
    def key_ids(self) -> list[str]:
        """Ids of every KEK held, oldest first."""

    def describe(self) -> str:
        return type(self).__name__


class LocalKey(KeyEncryptionKey):
    """A KEK held in this process's memory: AES-256-GCM over the data key.

    `source` names where the key was read from, for error messages.
    """

    def __init__(self, key_id: str, secret: bytes, source: str) -> None:
        if len(secret) != KEK_BYTES:
            raise ValueError(f"a key-encryption key has {KEK_BYTES} bytes")
        self.key_id = key_id
        self.source = source
        self._aead = AESGCM(secret)

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], context
            )
        except InvalidTag:
            raise UnwrapError(self.key_id, self.source) from None


def new_key_id(prefix: str) -> str:
    """Make a sortable id from the creation time and a random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"


def decode_key(text: str) -> bytes:
    """Decode a base64 KEK of 32 bytes; raise ValueError saying what is wrong,
    without showing the text."""
    if not text.strip():
        raise ValueError(f"it is empty; expected base64 of {KEK_BYTES} bytes")
    try:
        secret = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError(
            f"it is not valid base64; expected base64 of {KEK_BYTES} bytes"
        ) from None
    if len(secret) != KEK_BYTES:
        raise ValueError(
            f"it decodes to {len(secret)} bytes; expected base64 of {KEK_BYTES} bytes"
        )
    return secret


def generate_key_text() -> str:
    return base64.b64encode(secrets.token_bytes(KEK_BYTES)).decode()


class FileKeyring(Keyring):
    """KEK files `<id>.key` (base64) in one directory; `active` names one of them.

    The directory is created with mode 0700 and each file with 0600. A new
    installation gets its first key on first use.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: dict[str, LocalKey] = {}
        self._active_stamp: tuple[int, float] | None = None
        self._active_id: str | None = None

    def describe(self) -> str:
        return f"key files in {self.directory}"

    @property
    def _active_file(self) -> Path:
        return self.directory / "active"

    def active(self) -> KeyEncryptionKey:
        stamp = self._stamp()
        if stamp is None:
            return self.create()
        if stamp != self._active_stamp or self._active_id is None:
            self._active_id = self._active_file.read_text().strip()
            self._active_stamp = stamp
        return self.get(self._active_id)

    def get(self, key_id: str) -> KeyEncryptionKey:
        key = self._keys.get(key_id)
        if key is not None:
            return key
        path = self.directory / f"{key_id}.key"
        if "/" in key_id or not path.is_file():
            raise KeyUnavailableError(key_id)
        key = LocalKey(key_id, _read_key_file(path), f"key file {path.resolve()}")
        self._keys[key_id] = key
        return key

    def create(self) -> KeyEncryptionKey:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_id = new_key_id("file")
        _write_private(self.directory / f"{key_id}.key", generate_key_text() + "\n")
        _write_private(self.directory / ".active.tmp", key_id + "\n")
        os.replace(self.directory / ".active.tmp", self._active_file)
        log.info(
            "key-encryption key created", key_id=key_id, directory=str(self.directory)
        )
        return self.get(key_id)

    def retire(self, key_id: str) -> None:
        if self._stamp() is not None and key_id == self.active().key_id:
            raise KeyManagementError("the active key-encryption key cannot be retired")
        (self.directory / f"{key_id}.key").unlink(missing_ok=True)
        self._keys.pop(key_id, None)

    def key_ids(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(path.stem for path in self.directory.glob("*.key"))

    def _stamp(self) -> tuple[int, float] | None:
        try:
            status = os.stat(self._active_file)
        except FileNotFoundError:
            return None
        return (status.st_ino, status.st_mtime)


def _read_key_file(path: Path) -> bytes:
    """Read and decode one key file; raise KeyManagementError naming the file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not text"
        raise KeyManagementError(
            f"key file {path.resolve()} cannot be read: {reason}"
        ) from None
    try:
        return decode_key(text)
    except ValueError as error:
        raise KeyManagementError(
            f"key file {path.resolve()} is invalid: {error}. Restore it from the "
            "backup of this installation's keys"
        ) from None


class EnvKeyring(Keyring):
    """The KEK given in settings (an environment variable), and earlier ones."""

    def __init__(self, current: str, previous: list[str]) -> None:
        self._active = _env_key(current, "MOORAGE_ENCRYPTION_KEY")
        self._keys = {self._active.key_id: self._active}
        for text in previous:
            key = _env_key(text, "MOORAGE_ENCRYPTION_PREVIOUS_KEYS")
            self._keys.setdefault(key.key_id, key)

    retired_by_operator = "MOORAGE_ENCRYPTION_PREVIOUS_KEYS"

    def describe(self) -> str:
        return "the MOORAGE_ENCRYPTION_KEY variable"

    def active(self) -> KeyEncryptionKey:
        return self._active

    def get(self, key_id: str) -> KeyEncryptionKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyUnavailableError(key_id) from None

    def create(self) -> KeyEncryptionKey:
        raise KeyManagementError(
            "keys from the environment are rotated by hand: put the new key in "
            "MOORAGE_ENCRYPTION_KEY and the old one in "
            "MOORAGE_ENCRYPTION_PREVIOUS_KEYS, restart the server, then run "
            "`moorage key rotate --keep-active`"
        )

    def retire(self, key_id: str) -> None:
        raise KeyManagementError(
            "remove the key from MOORAGE_ENCRYPTION_PREVIOUS_KEYS to retire it"
        )

    def key_ids(self) -> list[str]:
        return list(self._keys)


def _env_key(text: str, variable: str) -> LocalKey:
    secret = decode_key(text)
    # The id names the key without revealing it: a hash of the key itself.
    fingerprint = hashlib.sha256(b"moorage-kek-id:" + secret).hexdigest()[:16]
    return LocalKey(f"env-{fingerprint}", secret, variable)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
