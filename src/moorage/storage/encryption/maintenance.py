"""Online key maintenance: rewrap data keys, re-encrypt and encrypt old objects.

All of it runs while the server serves:

- `rewrap_all` puts every envelope under the active key-encryption key. It
  rewrites only the small envelopes, never the data.
- `reencrypt_all` gives every object a new data key by writing an encrypted
  copy and moving it over the original. It records the last object done, so a
  second run continues where an interrupted one stopped.
- `encrypt_plaintext` converts objects stored before encryption was turned on;
  the server runs it in the background.
- `adopt_envelopes` moves data keys from installation envelopes to wraps under
  their owners' keys, for objects stored before owner keys existed; the server
  runs it in the background too.
- `record_object_paths` records the path of each blob stored before paths
  were recorded; the server runs it in the background at start-up.
- `claim_namespace` moves manifests and blob wraps that a push made for the
  vendor, in a namespace that a customer got afterwards, to that customer.
- `shred_owner` destroys one owner's key-encryption key and its wraps.

Manifests, sealed in the database, have their own counterpart of
`reencrypt_all` and of the background conversion: `manifests.reseal_manifests`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from moorage.db.key_store import KeyStore
from moorage.db.registry_store import RegistryStore
from moorage.db.wrap_store import VENDOR_OWNER, customer_owner
from moorage.digests import parse_digest
from moorage.storage import paths
from moorage.storage.drivers.base import PathNotFoundError, StorageDriver
from moorage.storage.encryption.custody import (
    DataKeyCustody,
    DataKeyUnavailableError,
    wrapping_for,
)
from moorage.storage.encryption.database import DATABASE_KEY, rewrap_database_keys
from moorage.storage.encryption.driver import (
    ENVELOPES_PREFIX,
    WORK_PREFIX,
    EncryptedDriver,
    Envelope,
    envelope_path,
    wrap_context,
)
from moorage.storage.encryption.format import IntegrityError, MisplacedObjectError
from moorage.storage.encryption.manifests import reseal_manifests

log = structlog.get_logger(__name__)

STATE_PATH = f"{WORK_PREFIX}/state.json"
# A writer that took the old active key just before rotation may store its
# envelope a moment later; rotation looks again after this pause.
SETTLE_SECONDS = 1.0
# Blob paths looked up per query, and recorded per transaction, by
# `record_object_paths`.
_RECORD_BATCH = 500

# Called with (done, total): once with done 0 as soon as the objects are
# listed, so a progress bar shows its total from the start, then after each
# object.
Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    return None


@dataclass
class RewrapReport:
    # Every key rewrapped: installation envelopes, owner KEKs and the
    # database data key.
    rewrapped: int = 0
    # Installation envelopes that were under the active KEK already.
    already_current: int = 0
    # Installation envelopes rewrapped, by the KEK that wrapped them before.
    by_key: Counter[str] = field(default_factory=Counter)
    # Owner KEKs and the database data key rewrapped (`sealed_keys` rows).
    sealed_keys: int = 0
    # KEKs retired: deleted from the keyring.
    retired: list[str] = field(default_factory=list)
    # KEKs that wrap nothing now but that only the operator can remove, from
    # where `remove_from` names (`Keyring.retired_by_operator`).
    unused: list[str] = field(default_factory=list)
    remove_from: str | None = None
    # KEKs that still wrap keys after the rewrap, and so were kept: a process
    # that lacks the new active KEK wrapped them meanwhile.
    still_used: Counter[str] = field(default_factory=Counter)

    @property
    def envelopes(self) -> int:
        return self.rewrapped - self.sealed_keys


async def envelope_paths(driver: EncryptedDriver) -> list[str]:
    return await driver.inner.list(ENVELOPES_PREFIX)


@dataclass
class KeyUsage:
    """The keys each key-encryption key wraps, by kind, counted by KEK id."""

    # Owner KEKs in `sealed_keys`, which wrap the data keys of blobs and
    # manifests.
    owner_keys: Counter[str] = field(default_factory=Counter)
    # The database data key in `sealed_keys`.
    database_keys: Counter[str] = field(default_factory=Counter)
    # Installation envelopes: blob data keys from before owner keys.
    envelopes: Counter[str] = field(default_factory=Counter)

    def key_ids(self) -> set[str]:
        return set(self.owner_keys) | set(self.database_keys) | set(self.envelopes)


async def key_usage(
    driver: EncryptedDriver, database_keys: KeyStore | None = None
) -> KeyUsage:
    """Count the keys each key-encryption key wraps."""
    usage = KeyUsage()
    if database_keys is not None:
        for sealed in await database_keys.list():
            if sealed.name == DATABASE_KEY:
                usage.database_keys[sealed.key_id] += 1
            else:
                usage.owner_keys[sealed.key_id] += 1
    for path in await envelope_paths(driver):
        envelope = await _load_envelope(driver, path)
        if envelope is not None:
            usage.envelopes[envelope.key_id] += 1
    return usage


async def rewrap_all(
    driver: EncryptedDriver, progress: Progress = _no_progress
) -> RewrapReport:
    """Wrap every data key under the active KEK; return what was done."""
    report = RewrapReport()
    active = driver.keyring.active()
    paths = await envelope_paths(driver)
    progress(0, len(paths))
    for done, path in enumerate(paths, 1):
        envelope = await _load_envelope(driver, path)
        if envelope is None:
            pass  # deleted since it was listed
        elif envelope.key_id == active.key_id:
            report.already_current += 1
        else:
            context = wrap_context(bytes.fromhex(path.rsplit("/", 1)[1]))
            data_key = driver.keyring.get(envelope.key_id).unwrap(
                envelope.wrapped, context
            )
            renewed = Envelope(active.key_id, active.wrap(data_key, context))
            await driver.inner.put(path, renewed.to_bytes())
            report.rewrapped += 1
            report.by_key[envelope.key_id] += 1
        progress(done, len(paths))
    return report


async def rotate(
    driver: EncryptedDriver,
    database_keys: KeyStore | None = None,
    *,
    new_key: bool = True,
    retire: bool = True,
    progress: Progress = _no_progress,
) -> RewrapReport:
    """Make a new active KEK, rewrap every data key to it, and retire the others.

    Old keys are retired only after a second pass finds nothing left under them.
    """
    if new_key:
        driver.keyring.create()
    report = await rewrap_all(driver, progress)
    await asyncio.sleep(SETTLE_SECONDS)
    late = await rewrap_all(driver)
    report.rewrapped += late.rewrapped
    report.by_key.update(late.by_key)
    if database_keys is not None:
        report.sealed_keys = await rewrap_database_keys(database_keys, driver.keyring)
        report.rewrapped += report.sealed_keys
    active = driver.keyring.active().key_id
    previous = [key_id for key_id in driver.keyring.key_ids() if key_id != active]
    if retire and driver.keyring.retired_by_operator is not None and previous:
        await find_unused_keys(driver, database_keys, previous, report)
    elif retire:
        for key_id in previous:
            driver.keyring.retire(key_id)
            report.retired.append(key_id)
            log.info("key-encryption key retired", key_id=key_id)
    log.info("data keys rewrapped", key_id=active, rewrapped=report.rewrapped)
    return report


async def find_unused_keys(
    driver: EncryptedDriver,
    database_keys: KeyStore | None,
    previous: list[str],
    report: RewrapReport,
) -> None:
    """Sort the earlier KEKs of a keyring that cannot retire keys itself into
    those the operator can remove and those that still wrap keys.

    With the `env` source a server that still runs with the old
    MOORAGE_ENCRYPTION_KEY wraps new keys under it, so each KEK is checked
    after the rewrap, before `key rotate` names it as one to remove.
    """
    report.remove_from = driver.keyring.retired_by_operator
    usage = await key_usage(driver, database_keys)
    for key_id in previous:
        count = (
            usage.owner_keys[key_id]
            + usage.database_keys[key_id]
            + usage.envelopes[key_id]
        )
        if count:
            report.still_used[key_id] = count
        else:
            report.unused.append(key_id)


@dataclass
class ReencryptReport:
    reencrypted: int = 0
    # Objects whose data key shredding destroyed: nothing can read them, so
    # they are left as they are.
    shredded: int = 0


async def reencrypt_all(
    driver: EncryptedDriver,
    prefix: str,
    progress: Progress = _no_progress,
    *,
    restart: bool = False,
) -> ReencryptReport:
    """Give every object under `prefix` a new data key; resume an earlier run.

    Shredded objects are skipped and counted. Damaged ones raise
    IntegrityError, and a later run starts again at the object that failed.
    """
    state = {} if restart else await _load_state(driver)
    last = state.get("last", "") if state.get("prefix") == prefix else ""
    objects = await driver.list(prefix)
    progress(0, len(objects))
    report = ReencryptReport()
    for position, path in enumerate(objects, 1):
        if path > last:
            try:
                if await _replace_encrypted(driver, path):
                    report.reencrypted += 1
            except DataKeyUnavailableError:
                log.info("shredded object not re-encrypted", path=path)
                report.shredded += 1
            await _save_state(driver, {"prefix": prefix, "last": path})
        progress(position, len(objects))
    await driver.inner.delete(STATE_PATH)
    log.info(
        "objects re-encrypted",
        prefix=prefix,
        count=report.reencrypted,
        shredded=report.shredded,
    )
    return report


async def encrypt_plaintext(
    driver: EncryptedDriver, prefix: str, progress: Progress = _no_progress
) -> int:
    """Encrypt every object under `prefix` that is still stored in plaintext."""
    objects = await driver.list(prefix)
    progress(0, len(objects))
    converted = 0
    for position, path in enumerate(objects, 1):
        try:
            plaintext = await driver.read_header(path) is None
        except PathNotFoundError:
            plaintext = False
        if plaintext and await _replace_encrypted(driver, path):
            converted += 1
        progress(position, len(objects))
    if converted:
        log.info("plaintext objects encrypted", prefix=prefix, count=converted)
    return converted


async def _replace_encrypted(driver: EncryptedDriver, path: str) -> bool:
    """Write an encrypted copy of `path` with a new data key and move it in place.

    The new data key is wrapped for every owner that has a wrap of the old one
    or uses the object now. Readers that opened the old object keep reading it;
    the old wraps and envelope go once the copy is in place.
    """
    if not driver.encrypt_new:
        raise ValueError("encryption is turned off; turn it on to re-encrypt")
    try:
        old = await driver.read_header(path)
        if old is not None:
            # Raises DataKeyUnavailableError for a shredded object before any
            # new data key or wrap is made for it.
            await driver.data_key(path, old)
        owners: set[str] = set()
        if driver.custody is not None:
            owners = await _owners_with_keys(
                driver.custody, await owners_of_object(driver.custody, path)
            )
            if old is not None:
                owners.update(await driver.custody.owners(old.object_id))
        temporary = f"{WORK_PREFIX}/{uuid.uuid4().hex}"
        with wrapping_for(owners):
            writer = await driver.writer(temporary, 0)
        try:
            async for chunk in driver.read(path):
                await writer.write(chunk)
            await writer.commit()
        except BaseException:
            await writer.cancel()
            await driver.delete(temporary)
            raise
    except PathNotFoundError:
        return False
    if driver.custody is not None:
        # Recorded at `path` before the copy replaces the original there, so a
        # concurrent read opens either object. Both are recorded at `path`
        # until the old one is forgotten below.
        await driver.custody.wraps.move_path(temporary, path)
    # NOTE: an object deleted while it was copied comes back here; garbage
    # collection removes it again on its next run.
    await driver.inner.move(temporary, path)
    if old is not None:
        await driver.inner.delete(envelope_path(old.object_id))
        if driver.custody is not None:
            await driver.custody.forget([old.object_id])
    return True


async def _owners_with_keys(custody: DataKeyCustody, owners: set[str]) -> set[str]:
    """Keep the owners whose key exists now.

    A shredded customer whose repositories still link a blob has no key, and
    re-encryption must not make one: that would make readable again, under a
    new key, what shredding put out of its reach.
    """
    return {
        owner for owner in owners if await custody.owner_keys.reload(owner) is not None
    }


async def owners_of_object(custody: DataKeyCustody, path: str) -> set[str]:
    """Return the owners whose repositories use a blob or an upload, by its key."""
    digest = paths.blob_digest_of(path)
    if digest is not None:
        return await custody.wraps.owners_of_digest(digest)
    upload_id = paths.upload_id_of(path)
    if upload_id is not None:
        owner = await custody.wraps.owner_of_upload(upload_id)
        return set() if owner is None else {owner}
    return set()


async def record_object_paths(
    driver: EncryptedDriver, progress: Progress = _no_progress
) -> int:
    """Record the path of each encrypted blob that has none; return how many.

    Objects stored before paths were recorded have no row in `object_paths`,
    and open wherever no other object is recorded (see
    `DataKeyCustody.check_place`). This pass reads their headers and records
    them. An object found at several blob paths (a file copied before this
    pass) is recorded only at the path whose digest its content has. An
    object recorded at another path already is left for its next read to
    report. Uploads in progress are left out, because one that finishes while
    the pass reads it would be recorded at its upload path. Those that finish
    after the pass are recorded at the next start.
    """
    custody = driver.custody
    if custody is None:
        return 0
    objects = await driver.list(paths.BLOBS_PREFIX)
    progress(0, len(objects))
    found: dict[str, list[str]] = {}
    for start in range(0, len(objects), _RECORD_BATCH):
        batch = objects[start : start + _RECORD_BATCH]
        known = await custody.wraps.paths_recorded(batch)
        for path in batch:
            if path in known:
                continue
            try:
                header = await driver.read_header(path)
            except PathNotFoundError:
                continue
            if header is not None:
                found.setdefault(header.object_id.hex(), []).append(path)
        progress(min(start + _RECORD_BATCH, len(objects)), len(objects))
    places: dict[str, str] = {}
    for object_id, found_at in found.items():
        if len(found_at) > 1:
            found_at = [
                path for path in found_at if await _has_its_digest(driver, path)
            ]
        if len(found_at) == 1:
            places[found_at[0]] = object_id
    recorded = 0
    items = list(places.items())
    for start in range(0, len(items), _RECORD_BATCH):
        chunk = dict(items[start : start + _RECORD_BATCH])
        recorded += await custody.wraps.record_missing_paths(chunk)
    if recorded:
        log.info("paths of stored objects recorded", count=recorded)
    return recorded


async def _has_its_digest(driver: EncryptedDriver, path: str) -> bool:
    """Return whether a blob's content has the digest that its path names."""
    digest = paths.blob_digest_of(path)
    if digest is None:
        return False
    algorithm, expected = digest.split(":", 1)
    hasher = hashlib.new(algorithm)
    try:
        async for chunk in driver.read(path):
            hasher.update(chunk)
    except (PathNotFoundError, IntegrityError):
        return False
    return hasher.hexdigest() == expected


async def adopt_envelopes(
    driver: EncryptedDriver, progress: Progress = _no_progress
) -> int:
    """Wrap data keys kept in installation envelopes for their objects' owners.

    Objects under `blobs/` and `uploads/` that have no owner wrap yet get one
    per owner that uses them, and their envelope is deleted; return how many.
    Objects that no repository uses keep their envelope until garbage
    collection deletes them.
    """
    custody = driver.custody
    if custody is None or not await envelope_paths(driver):
        return 0
    objects = await driver.list(paths.BLOBS_PREFIX)
    objects += await driver.list(paths.UPLOADS_PREFIX)
    progress(0, len(objects))
    adopted = 0
    for position, path in enumerate(objects, 1):
        if await _adopt_envelope(driver, custody, path):
            adopted += 1
        progress(position, len(objects))
    if adopted:
        log.info("data keys moved from envelopes to owner keys", count=adopted)
    return adopted


async def _adopt_envelope(
    driver: EncryptedDriver, custody: DataKeyCustody, path: str
) -> bool:
    try:
        header = await driver.read_header(path)
    except PathNotFoundError:
        return False
    if header is None or await custody.owners(header.object_id):
        return False
    owners = await owners_of_object(custody, path)
    if not owners:
        return False
    envelope = envelope_path(header.object_id)
    if not await driver.inner.exists(envelope):
        return False
    data_key = await driver.data_key(path, header)
    await custody.wrap(header.object_id, data_key, owners)
    await driver.inner.delete(envelope)
    return True


@dataclass
class ClaimReport:
    manifests: int = 0
    blobs: int = 0


async def claim_namespace(
    driver: StorageDriver, store: RegistryStore, slug: str
) -> ClaimReport:
    """Seal for customer `slug` what pushes to its namespace sealed for the vendor.

    A server that looked up the owner of a repository just before the customer
    was created seals for the vendor for a moment longer (see
    `custody.DataKeyCustody.owner_of_repository`). Manifests of the namespace
    sealed for another owner are sealed again for the customer, and blobs its
    repositories use get a wrap for the customer, while the vendor's wrap goes
    unless a vendor repository uses the blob too.
    """
    report = ClaimReport()
    report.manifests = (await reseal_manifests(store, namespace=slug)).moved
    if isinstance(driver, EncryptedDriver) and driver.custody is not None:
        report.blobs = await claim_blobs(driver, customer_owner(slug))
    if report.manifests or report.blobs:
        log.info(
            "manifests and blobs moved to the namespace's customer",
            customer=slug,
            manifests=report.manifests,
            blobs=report.blobs,
        )
    return report


async def claim_blobs(driver: EncryptedDriver, owner: str) -> int:
    """Wrap the data key of each blob that `owner`'s repositories use and that
    other owners' wraps alone open, for `owner` too; return how many.

    The vendor's wrap of such a blob is deleted unless a vendor repository
    uses the blob. Blobs in plaintext or with an installation envelope only
    are left to `encrypt_plaintext` and `adopt_envelopes`.
    """
    custody = driver.custody
    if custody is None:
        return 0
    claimed = 0
    for digest in await custody.wraps.digests_used_by(owner):
        path = paths.blob_path(parse_digest(digest))
        try:
            header = await driver.read_header(path)
        except PathNotFoundError:
            continue
        if header is None:
            continue
        owners = await custody.owners(header.object_id)
        if not owners or owner in owners:
            continue
        try:
            await driver.share(path, owner, digest)
        except (DataKeyUnavailableError, MisplacedObjectError):
            # Shredded, or a copy of another object that `share` has reported.
            continue
        await driver.release(path, VENDOR_OWNER, digest)
        claimed += 1
    return claimed


@dataclass
class ShredReport:
    key_destroyed: bool
    wraps_deleted: int
    # Stored objects (blobs and upload parts) that no key opens any more.
    objects_unreadable: int
    # Blobs of the owner's repositories among them, now reported as unknown.
    blobs_unreadable: int
    # Manifests of the owner's repositories, sealed under the destroyed key.
    manifests_unreadable: int = 0


async def shred_owner(
    driver: EncryptedDriver, owner: str, manifests: RegistryStore | None = None
) -> ShredReport:
    """Destroy an owner's key-encryption key and every wrap made under it.

    `objects_unreadable` counts the objects whose only wrap was the owner's;
    they are recorded as shredded in the same transaction, and those that are
    blobs of the owner's repositories are marked so that HEAD and GET answer
    BLOB_UNKNOWN. Mapping blobs to objects reads the header of every blob
    that the owner's repositories use.

    With `manifests`, manifest rows that the database data key or another
    owner's key still seals are first sealed for their owners, so that the
    owner's manifests are sealed under the key destroyed, and the key's id is
    recorded as shredded. Blobs of the owner's repositories that only other
    owners' wraps open get the owner's wrap first, as `claim_blobs` does.
    """
    custody = driver.custody
    if custody is None:
        raise ValueError("owner keys are not attached to this storage driver")
    fingerprint = None
    if manifests is not None:
        await reseal_manifests(manifests)
        kek = await custody.owner_keys.reload(owner)
        fingerprint = None if kek is None else kek.fingerprint.hex()
    if await custody.owner_keys.reload(owner) is not None:
        # Blobs that a push wrapped for the vendor alone would stay readable.
        await claim_blobs(driver, owner)
    blob_objects = await _blob_objects(
        driver, await custody.wraps.digests_used_by(owner)
    )
    counts = await custody.shred(owner, blob_objects, fingerprint)
    log.info(
        "owner key-encryption key destroyed",
        owner=owner,
        existed=counts.key_destroyed,
        wraps_deleted=counts.wraps_deleted,
        objects_unreadable=counts.objects_unreadable,
        blobs_unreadable=counts.blobs_unreadable,
        manifests_unreadable=counts.manifests_unreadable,
    )
    return ShredReport(
        counts.key_destroyed,
        counts.wraps_deleted,
        counts.objects_unreadable,
        counts.blobs_unreadable,
        counts.manifests_unreadable,
    )


async def _blob_objects(driver: EncryptedDriver, digests: list[str]) -> dict[str, str]:
    """Map the object id in each stored blob's header to the blob's digest."""
    found: dict[str, str] = {}
    for digest in digests:
        try:
            header = await driver.read_header(paths.blob_path(parse_digest(digest)))
        except PathNotFoundError:
            continue
        if header is not None:
            found[header.object_id.hex()] = digest
    return found


async def _load_envelope(driver: EncryptedDriver, path: str) -> Envelope | None:
    try:
        data = b"".join([chunk async for chunk in driver.inner.read(path)])
    except PathNotFoundError:
        return None
    return Envelope.from_bytes(data)


async def _load_state(driver: EncryptedDriver) -> dict[str, str]:
    try:
        data = b"".join([chunk async for chunk in driver.inner.read(STATE_PATH)])
    except PathNotFoundError:
        return {}
    value: dict[str, str] = json.loads(data)
    return value


async def _save_state(driver: EncryptedDriver, state: dict[str, str]) -> None:
    await driver.inner.put(STATE_PATH, json.dumps(state).encode())
