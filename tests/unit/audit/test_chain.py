"""The hash chain, its checker and self-verifying export files."""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage.audit import files
from moorage.audit.checkpoints import CheckpointSigner, CheckpointVerifier
from moorage.audit.events import (
    EVENT_FIELDS,
    GENESIS_HASH,
    AuditEvent,
    StoredEvent,
    _document,
    canonical_document,
    chain,
    chain_with_times,
    event_dict,
    event_hash,
    fit,
    format_time,
    new_event,
)
from moorage.audit.verify import ChainChecker, Verification
from moorage.db.schema import audit_events


def _events(count: int) -> list[AuditEvent]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        AuditEvent(
            "manifest.pull",
            time=start.replace(second=index % 60),
            actor_account="alice",
            actor_customer="acme",
            repository="acme/app",
            reference=f"v{index}",
            bytes=100 + index,
        )
        for index in range(count)
    ]


def _check(stored: list[StoredEvent]) -> Verification:
    checker = ChainChecker(0, GENESIS_HASH)
    for item in stored:
        if not checker.add(item):
            break
    return checker.finish((stored[-1].seq, stored[-1].hash) if stored else None)


def _signer() -> CheckpointSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return CheckpointSigner("test-key", pem)


def test_chain_intact_verifies() -> None:
    """An untouched chain verifies and counts every event."""
    result = _check(chain(_events(10), 0, GENESIS_HASH))
    assert result.ok, result.problem
    assert result.events == 10
    assert result.last_seq == 10


def test_hash_covers_every_field() -> None:
    """Changing any one field of an event changes its hash."""
    event = _events(1)[0]
    original = event_hash(1, event, GENESIS_HASH)
    changes = {
        "action": "blob.pull",
        "outcome": "failure",
        "actor_account": "bob",
        "actor_customer": "other",
        "source_address": "10.0.0.1",
        "user_agent": "curl",
        "repository": "acme/other",
        "reference": "v9",
        "digest": "sha256:" + "a" * 64,
        "bytes": 1,
        "reason": "x",
        "request_id": "r",
        "link": "l",
        "time": datetime(2027, 1, 1, tzinfo=UTC),
    }
    for name, value in changes.items():
        assert (
            event_hash(1, replace(event, **{name: value}), GENESIS_HASH) != original
        ), name
    assert event_hash(2, event, GENESIS_HASH) != original


def _json_dumps_document(seq: int, event: AuditEvent, prev_hash: str) -> str:
    """Return the hashed document as its definition states it: plain json.dumps."""
    document = {"seq": seq, **event_dict(event), "prev_hash": prev_hash}
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


@pytest.mark.parametrize(
    "event",
    [
        AuditEvent("manifest.pull", time=datetime(2026, 1, 1, tzinfo=UTC)),
        AuditEvent(
            "blob.pull",
            time=datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
            actor_account="alice@example.com",
            actor_customer="acme",
            source_address="2001:db8::1",
            user_agent='skopeo/1.9 "quoted" \\ back\\slash',
            repository="acme/app",
            reference="v1",
            digest="sha256:" + "ab" * 32,
            bytes=2**40,
            reason="control \x00\x1f\t\n and line separator \u2028 é 漢字 😀",
            request_id="0123456789abcdef",
            link="fedcba9876543210",
        ),
        AuditEvent(
            "auth.login",
            outcome="failure",
            time=datetime(2026, 3, 1, 12, tzinfo=timezone(timedelta(hours=-5))),
            bytes=0,
            reason="",
        ),
        AuditEvent("upload.start", time=datetime(999, 1, 1, tzinfo=UTC), bytes=-1),
    ],
)
def test_canonical_document_equals_json_dumps(event: AuditEvent) -> None:
    expected = _json_dumps_document(7, event, "f" * 64)
    assert canonical_document(7, event, "f" * 64) == expected
    assert json.loads(expected)["seq"] == 7


def test_new_event_sets_each_field() -> None:
    """new_event passes its arguments positionally; each lands in its field."""
    values = {name: f"value of {name}" for name in EVENT_FIELDS}
    values["bytes"] = 42
    del values["time"]
    before = datetime.now(UTC)
    event = new_event(**values)
    for name, value in values.items():
        assert getattr(event, name) == value, name
    assert before <= event.time <= datetime.now(UTC)


def test_document_keys_sorted_and_complete() -> None:
    """orjson keeps insertion order, so the document is built with sorted keys."""
    event = AuditEvent("manifest.pull")
    keys = list(_document(1, event, GENESIS_HASH, format_time(event.time)))
    assert keys == sorted(keys)
    assert set(keys) == {"seq", "prev_hash", *EVENT_FIELDS}


def test_chain_with_times_matches_chain() -> None:
    """Both give the same hashes; the times are the text the hash covers."""
    events = [
        AuditEvent("manifest.pull", time=datetime(2026, 1, 1, tzinfo=UTC)),
        AuditEvent("blob.pull", time=datetime(999, 1, 1, 0, 0, 0, 5, tzinfo=UTC)),
    ]
    stored, times = chain_with_times(events, 4, "a" * 64)
    assert [item.hash for item in stored] == [
        item.hash for item in chain(events, 4, "a" * 64)
    ]
    assert times == [format_time(event.time) for event in events]


def test_chain_with_times_matches_event_hash() -> None:
    """The writer's inlined loop hashes what `event_hash` hashes, on its fast
    path (a UTC time with microseconds) and on each of its slow ones."""
    events = [
        AuditEvent("manifest.pull", time=datetime(2026, 1, 1, 0, 0, 0, 7, tzinfo=UTC)),
        AuditEvent("manifest.pull", time=datetime(2026, 1, 1, tzinfo=UTC)),
        AuditEvent(
            "blob.pull",
            time=datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=9))),
        ),
        AuditEvent("blob.pull", time=datetime(999, 1, 1, 0, 0, 0, 5, tzinfo=UTC)),
        AuditEvent("blob.push", bytes=2**70, reason="beyond 64 bits"),
        AuditEvent("blob.push", user_agent='quoted " and \\ é 漢字 😀 \u2028'),
    ]
    stored, times = chain_with_times(events, 10, "c" * 64)
    prev_hash = "c" * 64
    for seq, (item, event) in enumerate(zip(stored, events, strict=True), start=11):
        assert item.seq == seq
        assert item.prev_hash == prev_hash
        assert item.hash == event_hash(seq, event, prev_hash), event
        prev_hash = item.hash
    assert times == [format_time(event.time) for event in events]


# Characters whose JSON escaping differs between encoders, when any does.
_ESCAPE_CASES = (
    '\x00\x01\x08\t\n\x0b\x0c\r\x1f "\\/\x7f\x80\xa0é\u2028\u2029\ufeff\uffff漢😀'
)


def test_canonical_document_every_character() -> None:
    """Each character below U+0800, and some beyond, is written as json.dumps
    writes it."""
    characters = [
        chr(code) for code in range(0x800) if code not in range(0xD800, 0xE000)
    ]
    characters += list(_ESCAPE_CASES)
    for character in characters:
        event = AuditEvent(
            "manifest.pull",
            time=datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
            reason=f"a{character}b",
        )
        expected = _json_dumps_document(1, event, GENESIS_HASH)
        assert canonical_document(1, event, GENESIS_HASH) == expected, repr(character)


def _random_text(generator: random.Random) -> str | None:
    if generator.random() < 0.3:
        return None
    pool = _ESCAPE_CASES + "abcxyz09-_:/@$+"
    return "".join(generator.choice(pool) for _ in range(generator.randrange(0, 12)))


def _random_time(generator: random.Random) -> datetime:
    year = generator.choice([1, 999, 1000, 1970, 2026, 9999])
    microsecond = generator.choice([0, 1, 123456, 999999])
    zone = generator.choice([UTC, timezone(timedelta(hours=5, minutes=30))])
    return datetime(year, 6, 15, 12, 30, 45, microsecond, tzinfo=zone)


def test_canonical_document_random_events() -> None:
    """Random events, with the values that orjson rejects or writes in its own
    way (ints beyond 64 bits, times without microseconds or before year 1000,
    other time zones), hash as the json.dumps document does."""
    generator = random.Random(4)  # noqa: S311 (test data)
    sizes = [None, 0, -1, 2**40, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]
    for _ in range(2000):
        values = {name: _random_text(generator) for name in _TEXT_FIELD_NAMES}
        event = AuditEvent(
            generator.choice(["manifest.pull", "blob.pull", "alert.x"]),
            outcome=generator.choice(["success", "failure"]),
            time=_random_time(generator),
            bytes=generator.choice(sizes),
            **values,
        )
        seq = generator.randrange(1, 2**40)
        expected = _json_dumps_document(seq, event, "e" * 64)
        assert canonical_document(seq, event, "e" * 64) == expected, event
        digest = hashlib.sha256(expected.encode()).hexdigest()
        assert event_hash(seq, event, "e" * 64) == digest, event


_TEXT_FIELD_NAMES = (
    "actor_account",
    "actor_customer",
    "source_address",
    "user_agent",
    "repository",
    "reference",
    "digest",
    "reason",
    "request_id",
    "link",
)


@pytest.mark.parametrize("name", _TEXT_FIELD_NAMES)
def test_fit_cuts_only_past_column_width(name: str) -> None:
    """fit keeps a value as long as its column and cuts one character more."""
    width = audit_events.c[name].type.length
    at_width = AuditEvent("manifest.pull", **{name: "x" * width})
    past_width = AuditEvent("manifest.pull", **{name: "y" * (width + 1)})
    assert fit(at_width) is at_width
    assert getattr(fit(past_width), name) == "y" * width


def test_chain_names_altered_event() -> None:
    """An edited field is reported at that event."""
    stored = chain(_events(10), 0, GENESIS_HASH)
    stored[4] = replace(stored[4], event=replace(stored[4].event, bytes=999))
    result = _check(stored)
    assert result.bad_seq == 5
    assert "event 5 was altered" in (result.problem or "")


def test_chain_names_removed_event() -> None:
    """A removed event is reported by its sequence number."""
    stored = chain(_events(10), 0, GENESIS_HASH)
    del stored[6]
    result = _check(stored)
    assert result.bad_seq == 7
    assert "event 7 is missing" in (result.problem or "")


def test_chain_names_reordered_event() -> None:
    """Two events swapped in place (sequence numbers kept) are reported at the first."""
    stored = chain(_events(10), 0, GENESIS_HASH)
    third, fourth = stored[2], stored[3]
    stored[2] = replace(fourth, seq=3)
    stored[3] = replace(third, seq=4)
    result = _check(stored)
    assert result.bad_seq == 3


def test_chain_names_rehashed_event() -> None:
    """An edit with a recomputed hash still breaks the link to the next event."""
    stored = chain(_events(10), 0, GENESIS_HASH)
    edited = replace(stored[4].event, actor_account="mallory")
    stored[4] = replace(
        stored[4], event=edited, hash=event_hash(5, edited, stored[3].hash)
    )
    result = _check(stored)
    assert result.bad_seq == 6
    assert "does not follow event 5" in (result.problem or "")


def test_chain_names_removed_last_event() -> None:
    """Removing the newest event is caught by the recorded head."""
    stored = chain(_events(5), 0, GENESIS_HASH)
    checker = ChainChecker(0, GENESIS_HASH)
    for item in stored[:-1]:
        checker.add(item)
    result = checker.finish((5, stored[-1].hash))
    assert result.bad_seq == 5
    assert "event 5 is missing" in (result.problem or "")


def test_checkpoint_past_end_names_cut_tail() -> None:
    """Cutting events off the end and rewriting the head fails on a checkpoint
    that names one of the removed events."""
    signer = _signer()
    stored = chain(_events(10), 0, GENESIS_HASH)
    checkpoints = [
        signer.sign(5, stored[4].hash, datetime.now(UTC)),
        signer.sign(10, stored[9].hash, datetime.now(UTC)),
    ]
    checker = ChainChecker(0, GENESIS_HASH, keep={5, 10})
    for item in stored[:8]:
        checker.add(item)
    checker.finish((8, stored[7].hash))
    checker.check_checkpoints(checkpoints, CheckpointVerifier(signer.jwks()))
    assert checker.result.bad_seq == 9
    assert "past the end of the log (event 8)" in (checker.result.problem or "")


def test_checkpoint_before_anchor_ignored() -> None:
    """A checkpoint of an archived event (before the anchor) is not a problem."""
    signer = _signer()
    stored = chain(_events(10), 0, GENESIS_HASH)
    checkpoints = [signer.sign(3, stored[2].hash, datetime.now(UTC))]
    checker = ChainChecker(5, stored[4].hash, keep={3})
    for item in stored[5:]:
        checker.add(item)
    checker.finish((10, stored[9].hash))
    checker.check_checkpoints(checkpoints, CheckpointVerifier(signer.jwks()))
    assert checker.result.problem is None


def _export(tmp_path: Path, signer: CheckpointSigner, count: int = 20) -> Path:
    stored = chain(_events(count), 0, GENESIS_HASH)
    out = io.StringIO()
    files.write_header(out, 1, count, signer.jwks())
    for item in stored:
        files.write_event(out, item)
    files.write_checkpoint(out, signer.sign(10, stored[9].hash, datetime.now(UTC)))
    files.write_checkpoint(out, signer.sign(count, stored[-1].hash, datetime.now(UTC)))
    path = tmp_path / "export.jsonl"
    path.write_text(out.getvalue())
    return path


def test_export_verifies_on_its_own(tmp_path: Path) -> None:
    """An export with its keys and checkpoints verifies without the database."""
    path = _export(tmp_path, _signer())
    result = files.verify_export(files.read_export(path))
    assert result.ok, result.problem
    assert result.checkpoints == 2
    assert result.warnings == []


def test_export_rehashed_tail_fails_checkpoint(tmp_path: Path) -> None:
    """Rewriting the last events with fresh hashes contradicts the signed checkpoint."""
    path = _export(tmp_path, _signer())
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    events = [StoredEvent.from_dict(r) for r in records if r["type"] == "event"]
    edited = replace(events[-1].event, bytes=1)
    events[-1] = replace(
        events[-1], event=edited, hash=event_hash(20, edited, events[-2].hash)
    )
    records[20] = {"type": "event", **events[-1].to_dict()}
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = files.verify_export(files.read_export(path))
    assert result.bad_seq == 20
    assert "signed checkpoint" in (result.problem or "")


def test_export_forged_signature_fails(tmp_path: Path) -> None:
    """Checkpoints signed by a key other than the trusted one are rejected."""
    path = _export(tmp_path, _signer())
    trusted = _signer().jwks()
    trusted["keys"][0]["kid"] = "test-key"
    result = files.verify_export(files.read_export(path), trusted)
    assert not result.ok
    assert "invalid signature" in (result.problem or "")


def _rehash(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Recompute every event's hashes, as a forger without the signing key can."""
    previous = GENESIS_HASH
    out = []
    for record in records:
        if record["type"] == "event":
            stored = StoredEvent.from_dict(record)
            digest = event_hash(stored.seq, stored.event, previous)
            record = {**record, "prev_hash": previous, "hash": digest}
            previous = digest
        out.append(record)
    return out


def _write(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_export_without_checkpoint_fails(tmp_path: Path) -> None:
    """An export whose checkpoints were removed fails: every export ends with one."""
    path = _export(tmp_path, _signer())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    _write(path, [r for r in records if r["type"] != "checkpoint"])
    result = files.verify_export(files.read_export(path))
    assert not result.ok
    assert result.bad_seq == 1
    assert "event 20, the last in the file, has no signed checkpoint" in (
        result.problem or ""
    )


def test_export_forged_without_checkpoints_fails_with_trusted_keys(
    tmp_path: Path,
) -> None:
    """Editing an event, rehashing the chain and dropping the checkpoints does
    not pass with the registry's own keys."""
    signer = _signer()
    path = _export(tmp_path, signer)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        if record["type"] == "event" and record["seq"] == 5:
            record["source_address"] = "10.9.9.9"
    forged = _rehash([r for r in records if r["type"] != "checkpoint"])
    _write(path, forged)
    result = files.verify_export(files.read_export(path), signer.jwks())
    assert not result.ok
    assert "has no signed checkpoint" in (result.problem or "")


def test_export_cut_tail_with_lowered_header_fails(tmp_path: Path) -> None:
    """Dropping the newest events, the last checkpoint, and lowering the header's
    range leaves an earlier checkpoint only: the file names the first event it
    does not cover."""
    path = _export(tmp_path, _signer())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["last_seq"] = 15
    kept = [
        r
        for r in records
        if not (r["type"] in ("event", "checkpoint") and int(r["seq"]) > 15)
    ]
    _write(path, kept)
    result = files.verify_export(files.read_export(path))
    assert not result.ok
    assert result.bad_seq == 11
    assert "event 15, the last in the file, has no signed checkpoint" in (
        result.problem or ""
    )


def test_export_header_without_events_fails(tmp_path: Path) -> None:
    """A file that keeps the header's range but none of its events fails."""
    path = _export(tmp_path, _signer())
    header = path.read_text().splitlines()[0]
    path.write_text(header + "\n")
    result = files.verify_export(files.read_export(path))
    assert not result.ok
    assert result.bad_seq == 1


def test_export_rejects_other_files(tmp_path: Path) -> None:
    """A file without the export header is rejected with a clear error."""
    path = tmp_path / "other.jsonl"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(files.ExportFormatError, match="header"):
        files.read_export(path)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("ev\0il", "ev\ufffdil"),
        ("a\ud800b\udfff", "a\ufffdb\ufffd"),
        ("caf\u00e9 \U0001f600", "caf\u00e9 \U0001f600"),
    ],
)
def test_fit_replaces_unstorable_characters(value: str, stored: str) -> None:
    """fit() replaces NUL and lone surrogates in every text field with U+FFFD
    and keeps other characters, so the event encodes as UTF-8."""
    event = AuditEvent(
        value, outcome=value, actor_account=value, reason=value, user_agent=value
    )
    fitted = fit(event)
    assert fitted.action == stored
    assert fitted.outcome == stored
    assert fitted.actor_account == stored
    assert fitted.reason == stored
    assert fitted.user_agent == stored
    canonical_document(1, fitted, GENESIS_HASH).encode()


def test_fit_cuts_after_replacing() -> None:
    """A replaced value is still cut to its column's width."""
    fitted = fit(AuditEvent("x", request_id="\0" * 100))
    assert fitted.request_id == "\ufffd" * 64
    assert fit(fitted) == fitted
