"""Owner keys: one key-encryption key per customer, and one for the vendor.

Every object's data key is wrapped once per owner whose repositories reference
the object, under that owner's key-encryption key (owner KEK), and the wraps are
kept in the `data_key_wraps` table. Each owner KEK is a random 256-bit key,
wrapped (sealed) by the installation KEK in the `sealed_keys` table under the
owner's name, so `moorage key rotate` rewraps owner KEKs together with the
database data key and never touches a blob.

Destroying an owner KEK (`moorage customer shred`) deletes its sealed row and
every wrap under it. An object that only that owner referenced then has no
wrap left that any key opens, in the live store and in every copy of the blob
store, and is recorded in `shredded_objects` in the same transaction. An object
that other owners reference keeps their wraps.

The blob read path unwraps one data key per object opened, with an owner KEK
taken from memory: owner KEKs are unwrapped by the installation KEK once per
process and then cached.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import structlog

from moorage.db.key_store import KeyStore
from moorage.db.wrap_store import VENDOR_OWNER, DataKeyWrap, ShredCounts, WrapStore
from moorage.storage.encryption.database import wrap_context as sealing_context
from moorage.storage.encryption.format import (
    DataKeyUnavailableError,
    MisplacedObjectError,
    wrap_context,
)
from moorage.storage.encryption.keys import (
    KEK_BYTES,
    Keyring,
    LocalKey,
    UnwrapError,
)

__all__ = [
    "DataKeyCustody",
    "DataKeyUnavailableError",
    "MisplacedObjectError",
    "OwnerKey",
    "OwnerKeys",
    "wrapping_for",
    "writing_for",
]

log = structlog.get_logger(__name__)

# Repository owners do not change once a customer owns the namespace.
_OWNER_CACHE_SECONDS = 60.0
# A namespace that has no customer yet belongs to the vendor until `customer
# add` creates one for it, so a vendor result is cached only briefly. A push
# that looked it up just before that seals for the vendor. `customer add`
# and `customer shred` move such manifests and blob wraps to the customer
# (see maintenance.claim_namespace), and the server's start-up reseal moves
# such manifests.
_VENDOR_OWNER_CACHE_SECONDS = 1.0

# The repository whose owner wraps the data keys of objects created in this
# context (an upload's data, an empty blob). Set by `writing_for`.
_writing_for: ContextVar[str | None] = ContextVar("moorage_writing_for", default=None)
# Owners given explicitly, by maintenance code that has looked them up.
_wrapping_for: ContextVar[tuple[str, ...] | None] = ContextVar(
    "moorage_wrapping_for", default=None
)


@contextmanager
def writing_for(repository: str) -> Iterator[None]:
    """Wrap the data keys of objects created in this block for `repository`'s owner."""
    token = _writing_for.set(repository)
    try:
        yield
    finally:
        _writing_for.reset(token)


@contextmanager
def wrapping_for(owners: Iterable[str]) -> Iterator[None]:
    """Wrap the data keys of objects created in this block for these owners."""
    token = _wrapping_for.set(tuple(sorted(set(owners))))
    try:
        yield
    finally:
        _wrapping_for.reset(token)


class OwnerKey(LocalKey):
    """An owner KEK, with an id that names this key and no other.

    The fingerprint is a hash of the key itself, so it stays the same when
    rotation rewraps the key and changes when shredding destroys the key and a
    new one is made for the same owner.
    """

    def __init__(self, owner: str, secret: bytes) -> None:
        super().__init__(owner, secret, "the sealed_keys table")
        self.fingerprint = hashlib.sha256(b"moorage-owner-kek-id:" + secret).digest()[
            :16
        ]


class OwnerKeys:
    """Owner KEKs, sealed in `sealed_keys` by the installation KEK, cached unwrapped."""

    def __init__(self, sealed: KeyStore, keyring: Keyring) -> None:
        self.sealed = sealed
        self.keyring = keyring
        # owner -> (the sealed bytes it was unwrapped from, the key)
        self._cache: dict[str, tuple[bytes, OwnerKey]] = {}

    async def get(self, owner: str) -> OwnerKey | None:
        """Return the owner's KEK, or None when it does not exist (or was destroyed)."""
        cached = self._cache.get(owner)
        if cached is not None:
            return cached[1]
        return await self.reload(owner)

    async def reload(self, owner: str) -> OwnerKey | None:
        """Read the owner's KEK from the database again, replacing the cached copy."""
        stored = await self.sealed.get(owner)
        if stored is None:
            self._cache.pop(owner, None)
            return None
        return self._remember(owner, stored.key_id, stored.wrapped)

    async def current(self, owner: str) -> OwnerKey:
        """Return the owner's KEK as stored now, creating it on first use.

        Wrapping a new data key goes through here rather than the cache, so a
        key destroyed and made again by another process is never used stale.
        """
        stored = await self.sealed.get(owner)
        if stored is None:
            kek = self.keyring.active()
            candidate = kek.wrap(os.urandom(KEK_BYTES), sealing_context(owner))
            stored = await self.sealed.get_or_add(owner, kek.key_id, candidate)
            if stored.wrapped == candidate:
                log.info("owner key-encryption key created", owner=owner)
        cached = self._cache.get(owner)
        if cached is not None and cached[0] == stored.wrapped:
            return cached[1]
        return self._remember(owner, stored.key_id, stored.wrapped)

    def forget(self, owner: str) -> None:
        """Drop the owner's KEK from this process's memory."""
        self._cache.pop(owner, None)

    def _remember(self, owner: str, key_id: str, wrapped: bytes) -> OwnerKey:
        secret = self.keyring.get(key_id).unwrap(wrapped, sealing_context(owner))
        key = OwnerKey(owner, secret)
        self._cache[owner] = (wrapped, key)
        return key


class DataKeyCustody:
    """Wraps and unwraps object data keys under the keys of the objects' owners."""

    def __init__(self, owner_keys: OwnerKeys, wraps: WrapStore) -> None:
        self.owner_keys = owner_keys
        self.wraps = wraps
        self._owners: dict[str, tuple[float, str]] = {}

    async def owners_for_new_object(self) -> tuple[str, ...]:
        """Return the owners set by `wrapping_for` or `writing_for`, or none."""
        explicit = _wrapping_for.get()
        if explicit is not None:
            return explicit
        repository = _writing_for.get()
        if repository is None:
            return ()
        return (await self.owner_of_repository(repository),)

    async def owner_of_repository(self, repository: str) -> str:
        now = time.monotonic()
        cached = self._owners.get(repository)
        if cached is not None and cached[0] > now:
            return cached[1]
        owner = await self.wraps.owner_of_repository(repository)
        ttl = (
            _VENDOR_OWNER_CACHE_SECONDS
            if owner == VENDOR_OWNER
            else _OWNER_CACHE_SECONDS
        )
        self._owners[repository] = (now + ttl, owner)
        return owner

    async def wrap(
        self,
        object_id: bytes,
        data_key: bytes,
        owners: Iterable[str],
        path: str | None = None,
    ) -> None:
        """Store one wrap of the data key per owner (kept when one exists), and
        the path of a new object when given."""
        await self.wraps.add(
            object_id.hex(), await self.wraps_for(object_id, data_key, owners), path
        )

    async def record_path(self, object_id: bytes, path: str) -> None:
        """Record the path of a new object whose data key has no wraps."""
        await self.wraps.record_path(object_id.hex(), path)

    async def check_place(
        self, path: str, object_id: bytes, recorded: str | None = None
    ) -> None:
        """Raise MisplacedObjectError unless the object may be opened at `path`.

        An object opens only at the path recorded for it. An object with no
        recorded path (stored before paths were recorded, and not yet found by
        the server's start-up pass) opens only where no other object is
        recorded. `recorded` is the object's path when the caller has read it.
        """
        if recorded is None:
            place = await self.wraps.place(object_id.hex(), path)
            if place.path is None:
                if place.path_has_others:
                    raise MisplacedObjectError(
                        path,
                        f"object {object_id.hex()} has no recorded path, and "
                        "other objects are recorded at this path",
                    )
                return
            recorded = place.path
        if recorded != path:
            raise MisplacedObjectError(
                path,
                f"object {object_id.hex()} belongs at {recorded}: its file was "
                "copied or moved here",
            )

    async def wraps_for(
        self, object_id: bytes, data_key: bytes, owners: Iterable[str]
    ) -> list[DataKeyWrap]:
        """Wrap the data key under each owner's KEK, without storing the wraps."""
        context = wrap_context(object_id)
        wraps = []
        for owner in owners:
            kek = await self.owner_keys.current(owner)
            wraps.append(DataKeyWrap(owner, kek.wrap(data_key, context)))
        return wraps

    async def unwrap(self, path: str, object_id: bytes) -> bytes | None:
        """Return the object's data key, or None when it has no wraps here.

        Raises MisplacedObjectError when the object is recorded at another
        path than `path` (see `check_place`), and DataKeyUnavailableError when
        wraps exist but none opens, for example because every owner's key was
        destroyed. An object with wraps, recorded at `path`, costs one query.
        """
        wraps, recorded = await self.wraps.wraps_and_path(object_id.hex())
        if recorded != path:
            await self.check_place(path, object_id, recorded)
        if not wraps:
            return None
        context = wrap_context(object_id)
        for wrap in wraps:
            data_key = await self._unwrap_one(wrap, context)
            if data_key is not None:
                return data_key
        owners = ", ".join(wrap.owner for wrap in wraps)
        raise DataKeyUnavailableError(
            path, f"its data key does not unwrap under the keys of {owners}"
        )

    async def shred(
        self,
        owner: str,
        blob_objects: Mapping[str, str] | None = None,
        key_fingerprint: str | None = None,
    ) -> ShredCounts:
        """Destroy the owner's KEK and every wrap under it (see WrapStore.shred)."""
        self.owner_keys.forget(owner)
        return await self.wraps.shred(owner, blob_objects, key_fingerprint)

    async def shredded(self, object_id: bytes) -> bool:
        """Return whether shredding deleted the object's last wrap."""
        return await self.wraps.shredded(object_id.hex())

    async def owners(self, object_id: bytes) -> list[str]:
        return [wrap.owner for wrap in await self.wraps.wraps(object_id.hex())]

    async def forget(self, object_ids: list[bytes]) -> None:
        await self.wraps.remove_objects([object_id.hex() for object_id in object_ids])

    async def _unwrap_one(self, wrap: DataKeyWrap, context: bytes) -> bytes | None:
        kek = await self.owner_keys.get(wrap.owner)
        if kek is None:
            return None
        try:
            return kek.unwrap(wrap.wrapped, context)
        except UnwrapError:
            pass
        # The cached owner KEK may be one that another process destroyed and
        # made again since: read it once more before giving up on this wrap.
        kek = await self.owner_keys.reload(wrap.owner)
        if kek is None:
            return None
        try:
            return kek.unwrap(wrap.wrapped, context)
        except UnwrapError:
            return None
