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
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

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
# Administrative actions.
CUSTOMER_ADD = "customer.add"
CUSTOMER_SUSPEND = "customer.suspend"
CUSTOMER_RESUME = "customer.resume"
CUSTOMER_SHRED = "customer.shred"
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
AUDIT_ARCHIVE = "audit.archive"
AUDIT_IMPORT = "audit.import"
# Stored in place of an event that the database rejected for its values.
AUDIT_REJECTED = "audit.rejected"
# Alerts raised by the detectors in moorage.audit.alerts.
ALERT_PREFIX = "alert."


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
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


# The hashed document's keys in sorted order, each with its JSON key prefix, and
# where its value sits in (seq, *EVENT_FIELDS, prev_hash).
_DOCUMENT_KEYS = ("seq", *EVENT_FIELDS, "prev_hash")
_SORTED_KEYS = tuple(sorted(_DOCUMENT_KEYS))
_KEY_PREFIXES = tuple(json.dumps(key) + ":" for key in _SORTED_KEYS)
_KEY_POSITIONS = tuple(_DOCUMENT_KEYS.index(key) for key in _SORTED_KEYS)
_TIME_POSITION = _DOCUMENT_KEYS.index("time")
# An event's field values as a tuple in EVENT_FIELDS order.
event_values = operator.attrgetter(*EVENT_FIELDS)
_encode_string = json.encoder.encode_basestring  # ensure_ascii=False's encoder


def _json_value(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is str:
        return _encode_string(value)
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_document(seq: int, event: AuditEvent, prev_hash: str) -> str:
    """Return the JSON document an event's hash covers.

    The result equals `json.dumps(document, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)` of {"seq", every event field with the time formatted,
    "prev_hash"}; it is built from precomputed key prefixes because the audit
    writer hashes every request's event, and json.dumps costs several times more.
    """
    values = [seq, *event_values(event), prev_hash]
    values[_TIME_POSITION] = format_time(event.time)
    members = [
        prefix + _json_value(values[position])
        for prefix, position in zip(_KEY_PREFIXES, _KEY_POSITIONS, strict=True)
    ]
    return "{" + ",".join(members) + "}"


def event_hash(seq: int, event: AuditEvent, prev_hash: str) -> str:
    """Return the chain hash of an event at position `seq` after `prev_hash`."""
    return hashlib.sha256(
        canonical_document(seq, event, prev_hash).encode()
    ).hexdigest()


def chain(events: list[AuditEvent], seq: int, prev_hash: str) -> list[StoredEvent]:
    """Chain new events after the event `seq` whose hash is `prev_hash`."""
    stored = []
    for event in events:
        seq += 1
        digest = event_hash(seq, event, prev_hash)
        stored.append(StoredEvent(seq, event, prev_hash, digest))
        prev_hash = digest
    return stored
