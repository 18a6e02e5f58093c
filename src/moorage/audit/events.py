"""Audit events, their actions, and the hash that chains them.

Each stored event's hash is the SHA-256 of a canonical JSON document (sorted
keys, no spaces, UTF-8) that contains every field of the event, its sequence
number and the previous event's hash. Changing, removing or moving any event
therefore changes every hash after it.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS_HASH = "0" * 64

SUCCESS = "success"
FAILURE = "failure"

# Registry actions (recorded from requests).
AUTH_LOGIN = "auth.login"
AUTH_TOKEN = "auth.token"  # noqa: S105 (an action name, not a secret)
TOKEN_ISSUE = "token.issue"  # noqa: S105 (an action name, not a secret)
ACCESS_DENIED = "access.denied"
MANIFEST_PULL = "manifest.pull"
BLOB_PULL = "blob.pull"
MANIFEST_PUSH = "manifest.push"
BLOB_PUSH = "blob.push"
BLOB_MOUNT = "blob.mount"
MANIFEST_DELETE = "manifest.delete"
BLOB_DELETE = "blob.delete"
UPLOAD_START = "upload.start"
UPLOAD_APPEND = "upload.append"
UPLOAD_CANCEL = "upload.cancel"
# Stored data (an encrypted blob, upload or manifest) failed its integrity check.
STORAGE_INTEGRITY = "storage.integrity"
# Administrative actions.
CUSTOMER_ADD = "customer.add"
CUSTOMER_SUSPEND = "customer.suspend"
CUSTOMER_RESUME = "customer.resume"
CUSTOMER_SHRED = "customer.shred"
# `customer offboard` records its steps as customer.suspend, customer.archive
# and customer.delete_repositories; a value it rejects as customer.offboard.
CUSTOMER_OFFBOARD = "customer.offboard"
CUSTOMER_ARCHIVE = "customer.archive"
CUSTOMER_DELETE_REPOSITORIES = "customer.delete_repositories"
# `customer offboard --delete-after` records the date; when it comes, the
# deletion is a customer.delete_repositories event.
CUSTOMER_SCHEDULE_DELETION = "customer.schedule_deletion"
USER_ADD = "user.add"
USER_DISABLE = "user.disable"
USER_ENABLE = "user.enable"
USER_REMOVE = "user.remove"
USER_ROLE = "user.role"
USER_PASSWORD_RESET = "user.password_reset"  # noqa: S105 (an action name)
VENDOR_USER_ADD = "vendor_user.add"
PASSWORD_CHANGE = "account.password_change"  # noqa: S105 (an action name)
ROBOT_ADD = "robot.add"
ROBOT_ROTATE = "robot.rotate"
ROBOT_DISABLE = "robot.disable"
ROBOT_ENABLE = "robot.enable"
ROBOT_REMOVE = "robot.remove"
ROBOT_ROLE = "robot.role"
PERSONAL_TOKEN_ADD = "personal_token.add"  # noqa: S105 (an action name)
PERSONAL_TOKEN_REVOKE = "personal_token.revoke"  # noqa: S105 (an action name)
REFRESH_TOKEN_REVOKE = "refresh_token.revoke"  # noqa: S105 (an action name)
LOGIN_UNLOCK = "login.unlock"
GRANT_ADD = "grant.add"
GRANT_REMOVE = "grant.remove"
SIGNING_KEY_ROTATE = "signing_key.rotate"
KEY_ROTATE = "key.rotate"
KEY_REENCRYPT = "key.reencrypt"
# A change that spans many transactions (key rotate, key reencrypt) records
# its action with this suffix before it starts, and the action when it ends.
START_SUFFIX = ".start"
# `backup create` records a start event and an end event (see START_SUFFIX);
# `backup restore` records its event in the restored installation.
BACKUP_CREATE = "backup.create"
BACKUP_RESTORE = "backup.restore"
# A garbage collection run, with its counts.
GC_RUN = "gc.run"
AUDIT_ARCHIVE = "audit.archive"
AUDIT_IMPORT = "audit.import"
# Stored in place of an event that the database rejected for its values.
AUDIT_REJECTED = "audit.rejected"
# Alerts raised by the detectors in moorage.audit.alerts.
ALERT_PREFIX = "alert."


def _action_names() -> frozenset[str]:
    """Collect the action constants above: every `group.name` string."""
    pattern = re.compile(r"[a-z_]+\.[a-z_]+")
    return frozenset(
        value
        for name, value in globals().items()
        if name.isupper() and isinstance(value, str) and pattern.fullmatch(value)
    )


# Every action an event can have, apart from the `.start` form of long changes
# and the `alert.<kind>` actions.
ACTIONS = _action_names()


def is_known_action(action: str) -> bool:
    """Return whether events can have `action`; a trailing `*` matches a prefix."""
    if action.endswith("*"):
        prefix = action[:-1]
        return any(
            name.startswith(prefix) or (name + START_SUFFIX).startswith(prefix)
            for name in ACTIONS | {ALERT_PREFIX}
        ) or prefix.startswith(ALERT_PREFIX)
    if action.startswith(ALERT_PREFIX):
        return len(action) > len(ALERT_PREFIX)
    return action.removesuffix(START_SUFFIX) in ACTIONS


def _now() -> datetime:
    return datetime.now(UTC)


# NOTE: AuditEvent and StoredEvent are not frozen, and code must not change
# them once made: a frozen dataclass's __init__ sets each field through
# object.__setattr__, which made building a request's event cost about 4 us
# instead of 1 us on the benchmark machine.
@dataclass(slots=True)
class AuditEvent:
    """One thing that happened. Never put a secret in any field."""

    action: str
    outcome: str = SUCCESS
    time: datetime = field(default_factory=_now)
    actor_account: str | None = None
    actor_customer: str | None = None
    source_address: str | None = None
    user_agent: str | None = None
    repository: str | None = None
    reference: str | None = None
    digest: str | None = None
    bytes: int | None = None
    reason: str | None = None
    request_id: str | None = None
    link: str | None = None


EVENT_FIELDS = tuple(f.name for f in fields(AuditEvent))


def new_event(
    action: str,
    outcome: str,
    *,
    actor_account: str | None,
    actor_customer: str | None,
    source_address: str | None,
    user_agent: str | None,
    repository: str | None,
    reference: str | None,
    digest: str | None,
    bytes: int | None,
    reason: str | None,
    request_id: str | None,
    link: str | None,
) -> AuditEvent:
    """Return an event of the current time, with every other field given.

    It calls the class with positional arguments, in field order. CPython 3.11
    passes keyword arguments to a class through a dict (type_call), and under
    callgrind that cost about 5,700 instructions for these twelve. Keyword
    arguments to a function need no dict.
    """
    return AuditEvent(
        action,
        outcome,
        _now(),
        actor_account,
        actor_customer,
        source_address,
        user_agent,
        repository,
        reference,
        digest,
        bytes,
        reason,
        request_id,
        link,
    )


# Column widths of the audit_events table; longer values are cut to fit.
_LIMITS = {
    "actor_account": 255,
    "actor_customer": 64,
    "source_address": 64,
    "user_agent": 255,
    "repository": 255,
    "reference": 255,
    "digest": 200,
    "reason": 500,
    "request_id": 64,
    "link": 64,
}


_LIMITED_FIELDS = tuple(_LIMITS)
_LIMITED_WIDTHS = tuple(_LIMITS.values())
_limited_values = operator.attrgetter(*_LIMITED_FIELDS)
# Every text field, in EVENT_FIELDS order.
_TEXT_FIELDS = tuple(name for name in EVENT_FIELDS if name not in ("time", "bytes"))
_text_values = operator.attrgetter(*_TEXT_FIELDS)
# Characters that PostgreSQL cannot store in a text column: NUL, and the lone
# surrogates that a str can hold but UTF-8 cannot encode.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT_CHARACTER = "\ufffd"


def fit(event: AuditEvent) -> AuditEvent:
    """Return the event as both databases store it, so that it reads back
    exactly as hashed.

    The time becomes UTC, each NUL or lone surrogate in a text field becomes
    U+FFFD, and long text is cut to the column widths.
    """
    if _needs_no_change(event):
        return event
    changes: dict[str, Any] = {}
    if event.time.tzinfo is not UTC:
        changes["time"] = event.time.astimezone(UTC)
    for name, value in zip(_TEXT_FIELDS, _text_values(event), strict=True):
        if value is not None and _UNSTORABLE.search(value):
            changes[name] = _UNSTORABLE.sub(REPLACEMENT_CHARACTER, value)
    values = _limited_values(event)
    for name, value, limit in zip(
        _LIMITED_FIELDS, values, _LIMITED_WIDTHS, strict=True
    ):
        value = changes.get(name, value)
        if value is not None and len(value) > limit:
            changes[name] = value[:limit]
    return replace(event, **changes) if changes else event


def fit_all(events: Sequence[AuditEvent]) -> list[AuditEvent]:
    """Return `fit` of each event, with one call per event that needs no change
    (nearly every one) instead of two."""
    return [event if _needs_no_change(event) else fit(event) for event in events]


def _needs_no_change(event: AuditEvent) -> bool:
    """Tell cheaply whether `fit` would return the event unchanged.

    The widths repeat _LIMITS, because a dict look-up per field costs more than
    the check itself; a unit test keeps the two equal. The text is joined from
    plain attribute reads: operator.attrgetter reads slots through the generic
    attribute look-up, which made this check cost about three times more.
    """
    text = (
        f"{event.action}{event.outcome}{event.actor_account or ''}"
        f"{event.actor_customer or ''}{event.source_address or ''}"
        f"{event.user_agent or ''}{event.repository or ''}{event.reference or ''}"
        f"{event.digest or ''}{event.reason or ''}{event.request_id or ''}"
        f"{event.link or ''}"
    )
    if not text.isascii() and _UNSTORABLE.search(text):
        return False
    return (
        "\x00" not in text
        and event.time.tzinfo is UTC
        and len(event.actor_account or "") <= 255
        and len(event.actor_customer or "") <= 64
        and len(event.source_address or "") <= 64
        and len(event.user_agent or "") <= 255
        and len(event.repository or "") <= 255
        and len(event.reference or "") <= 255
        and len(event.digest or "") <= 200
        and len(event.reason or "") <= 500
        and len(event.request_id or "") <= 64
        and len(event.link or "") <= 64
    )


@dataclass(slots=True)
class StoredEvent:
    """An event as stored: with its place in the chain."""

    seq: int
    event: AuditEvent
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            **event_dict(self.event),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredEvent:
        values: dict[str, Any] = {name: data.get(name) for name in EVENT_FIELDS}
        values["time"] = parse_time(str(data["time"]))
        return cls(
            int(data["seq"]),
            AuditEvent(**values),
            str(data["prev_hash"]),
            str(data["hash"]),
        )


def format_time(value: datetime) -> str:
    """Return a time as the audit trail writes it: UTC, microseconds, "Z"."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if value.microsecond and value.year >= 1000:
        # orjson formats in C, several times faster than isoformat, but it
        # leaves out a microsecond of 0 and writes early years differently.
        # Positional: parsing a keyword argument costs about as much again.
        return orjson.dumps(value, None, orjson.OPT_UTC_Z)[1:-1].decode()
    if value.year < 1000:
        # isoformat pads the year to four digits, strftime does not everywhere.
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # The offset of a UTC time is always "+00:00".
    return value.isoformat(timespec="microseconds")[:-6] + "Z"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def event_dict(event: AuditEvent) -> dict[str, Any]:
    # Plain getattr, because dataclasses.asdict deep-copies every value and
    # costs several times more on the audit writer's path.
    data = {name: getattr(event, name) for name in EVENT_FIELDS}
    data["time"] = format_time(event.time)
    return data


# An event's field values as a tuple in EVENT_FIELDS order.
event_values = operator.attrgetter(*EVENT_FIELDS)


def _document(seq: int, event: AuditEvent, prev_hash: str, time: str) -> dict[str, Any]:
    """Return the hashed document, its keys already in sorted order.

    orjson writes keys in insertion order, so this order makes its output equal
    json.dumps(..., sort_keys=True) without sorting each event's keys again (a
    unit test checks the order).
    """
    return {
        "action": event.action,
        "actor_account": event.actor_account,
        "actor_customer": event.actor_customer,
        "bytes": event.bytes,
        "digest": event.digest,
        "link": event.link,
        "outcome": event.outcome,
        "prev_hash": prev_hash,
        "reason": event.reason,
        "reference": event.reference,
        "repository": event.repository,
        "request_id": event.request_id,
        "seq": seq,
        "source_address": event.source_address,
        "time": time,
        "user_agent": event.user_agent,
    }


def _canonical_bytes(seq: int, event: AuditEvent, prev_hash: str, time: str) -> bytes:
    document = _document(seq, event, prev_hash, time)
    if document["bytes"] is None or type(document["bytes"]) is int:
        try:
            return orjson.dumps(document)
        except TypeError:
            pass  # an int beyond 64 bits, or a lone surrogate
    return _json_bytes(document)


def _json_bytes(document: dict[str, Any]) -> bytes:
    """Return the canonical bytes through json.dumps, for what orjson rejects."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def canonical_document(seq: int, event: AuditEvent, prev_hash: str) -> str:
    """Return the JSON document an event's hash covers.

    The result equals `json.dumps(document, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)` of {"seq", every event field with the time formatted,
    "prev_hash"}. orjson builds it, because the audit writer hashes every
    request's event and json.dumps costs several times more. orjson escapes
    strings as json.dumps does with ensure_ascii=False (a test checks every
    character below U+0800 and random text); ints beyond 64 bits and other
    types that orjson rejects or writes differently go through json.dumps.
    """
    return _canonical_bytes(seq, event, prev_hash, format_time(event.time)).decode()


def event_hash(seq: int, event: AuditEvent, prev_hash: str) -> str:
    """Return the chain hash of an event at position `seq` after `prev_hash`."""
    document = _canonical_bytes(seq, event, prev_hash, format_time(event.time))
    return hashlib.sha256(document).hexdigest()


def chain(events: list[AuditEvent], seq: int, prev_hash: str) -> list[StoredEvent]:
    """Chain new events after the event `seq` whose hash is `prev_hash`."""
    return chain_with_times(events, seq, prev_hash)[0]


def chain_with_times(
    events: list[AuditEvent], seq: int, prev_hash: str
) -> tuple[list[StoredEvent], list[str]]:
    """Chain new events as `chain` does, and return each event's time as well.

    The times are the text that the hash covers (`format_time`), so a caller
    that stores the time as text need not format it a second time.

    The audit writer runs this loop for every request's event, so it inlines
    `format_time`'s common case and `_canonical_bytes`: a Python call costs
    about as much as building the document's dict. A unit test checks the
    hashes against `event_hash`.
    """
    stored = []
    times = []
    sha256 = hashlib.sha256
    dumps = orjson.dumps
    utc_z = orjson.OPT_UTC_Z
    for event in events:
        seq += 1
        value = event.time
        if value.microsecond and value.tzinfo is UTC and value.year >= 1000:
            time = dumps(value, None, utc_z)[1:-1].decode()
        else:
            time = format_time(value)
        # The keys in sorted order, as in `_document`.
        document = {
            "action": event.action,
            "actor_account": event.actor_account,
            "actor_customer": event.actor_customer,
            "bytes": event.bytes,
            "digest": event.digest,
            "link": event.link,
            "outcome": event.outcome,
            "prev_hash": prev_hash,
            "reason": event.reason,
            "reference": event.reference,
            "repository": event.repository,
            "request_id": event.request_id,
            "seq": seq,
            "source_address": event.source_address,
            "time": time,
            "user_agent": event.user_agent,
        }
        count = event.bytes
        if count is None or type(count) is int:
            try:
                data = dumps(document)
            except TypeError:  # an int beyond 64 bits, or a lone surrogate
                data = _json_bytes(document)
        else:
            data = _json_bytes(document)
        digest = sha256(data).hexdigest()
        stored.append(StoredEvent(seq, event, prev_hash, digest))
        times.append(time)
        prev_hash = digest
    return stored, times
