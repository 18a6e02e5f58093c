"""Audit export files: JSON lines that verify on their own, and CSV.

A JSON lines export has one object per line, each with a `type`:

- `header` (first line): format name, `first_seq`, `last_seq` and `keys`, the
  JSON Web Key Set whose keys signed the checkpoints;
- `event`: a stored event with `seq`, `prev_hash` and `hash`;
- `checkpoint`: a signed checkpoint for an event in the file. An export always
  ends with a checkpoint for its last event.
"""

from __future__ import annotations

import csv
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from moorage.audit.checkpoints import Checkpoint, CheckpointVerifier
from moorage.audit.events import EVENT_FIELDS, StoredEvent, event_dict
from moorage.audit.verify import ChainChecker, Verification

FORMAT = "moorage-audit/1"
CSV_COLUMNS = ("seq", *EVENT_FIELDS, "prev_hash", "hash")


def _line(out: TextIO, data: dict[str, Any]) -> None:
    out.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n")


def write_header(
    out: TextIO, first_seq: int | None, last_seq: int | None, keys: dict[str, Any]
) -> None:
    header = {"first_seq": first_seq, "last_seq": last_seq, "keys": keys}
    _line(out, {"type": "header", "format": FORMAT, **header})


def write_event(out: TextIO, stored: StoredEvent) -> None:
    _line(out, {"type": "event", **stored.to_dict()})


def write_checkpoint(out: TextIO, checkpoint: Checkpoint) -> None:
    _line(out, {"type": "checkpoint", **checkpoint.to_dict()})


# A spreadsheet reads a cell that starts with one of these as a formula (the
# OWASP "CSV injection" rule), so a cell that does gets a leading single quote.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """Make one CSV cell safe to open in a spreadsheet.

    A text value that starts like a formula gets a leading `'`, and control
    characters become `\\xNN` escapes, so a user name such as
    `=HYPERLINK(...)` shows as text and every event stays on one line.
    Numbers and None are returned unchanged.
    """
    if not isinstance(value, str):
        return value
    quoted = "'" + value if value.startswith(_FORMULA_STARTS) else value
    if quoted.isprintable():
        return quoted
    return "".join(
        f"\\x{ord(character):02x}"
        if unicodedata.category(character) == "Cc"
        else character
        for character in quoted
    )


def write_csv_cells(writer: Any, row: Iterable[object]) -> None:
    """Write one row with every cell passed through `csv_cell`."""
    writer.writerow([csv_cell(value) for value in row])


def csv_writer(out: TextIO) -> Any:
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    return writer


def write_csv_row(writer: Any, stored: StoredEvent) -> None:
    values = event_dict(stored.event)
    row = [stored.seq, *(values[name] for name in EVENT_FIELDS)]
    write_csv_cells(writer, [*row, stored.prev_hash, stored.hash])


@dataclass
class ExportFile:
    header: dict[str, Any]
    events: list[StoredEvent] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)


class ExportFormatError(ValueError):
    """A file is not a Moorage audit export."""


def read_export(path: Path) -> ExportFile:
    """Read a JSON lines export; raise ExportFormatError on a malformed file."""
    with path.open(encoding="utf-8") as source:
        lines = [line for line in source if line.strip()]
    if not lines:
        raise ExportFormatError(f"{path} is empty")
    try:
        header = json.loads(lines[0])
        if header.get("type") != "header" or header.get("format") != FORMAT:
            raise ExportFormatError(f"{path} has no {FORMAT} header line")
        export = ExportFile(header)
        for number, line in enumerate(lines[1:], start=2):
            _add_record(export, json.loads(line), f"{path}:{number}")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ExportFormatError(f"{path}: malformed line: {error}") from None
    return export


def _add_record(export: ExportFile, record: dict[str, Any], where: str) -> None:
    kind = record.get("type")
    if kind == "event":
        export.events.append(StoredEvent.from_dict(record))
    elif kind == "checkpoint":
        export.checkpoints.append(Checkpoint.from_dict(record))
    else:
        raise ExportFormatError(f"{where}: unknown record type {kind!r}")


def verify_export(
    export: ExportFile, keys: dict[str, Any] | None = None
) -> Verification:
    """Check an export's chain and its signed checkpoints.

    The keys default to those in the file. An auditor who does not trust the
    file's keys passes the registry's published JWKS instead. The file's last
    event must match a valid checkpoint, because every export and archive ends
    with one.
    """
    events = export.events
    first_seq = export.header.get("first_seq")
    if not events:
        empty = Verification()
        if first_seq is not None:
            empty.problem = (
                f"event {first_seq} is missing: the header lists events from "
                f"{first_seq} but the file has none"
            )
            empty.bad_seq = int(first_seq)
        return empty
    start = int(first_seq) if first_seq is not None else events[0].seq
    keep = {checkpoint.seq for checkpoint in export.checkpoints}
    checker = ChainChecker(start - 1, events[0].prev_hash, keep)
    for stored in events:
        if not checker.add(stored):
            break
    last_seq = export.header.get("last_seq")
    if last_seq is not None and checker.result.problem is None:
        last = checker.result.last_seq or 0
        if int(last_seq) > last:
            checker.result.problem = (
                f"event {last + 1} is missing: the header lists events up to {last_seq}"
            )
            checker.result.bad_seq = last + 1
    verifier = CheckpointVerifier(keys or export.header.get("keys") or {})
    checker.check_checkpoints(export.checkpoints, verifier)
    result = checker.result
    newest = result.last_seq
    if result.problem is None and newest is not None and checker.signed_up_to != newest:
        # Every export and archive ends with a checkpoint of its last event.
        # Without this check, anyone could rehash edited events and drop the
        # checkpoints, or cut the tail and lower the unsigned header's range.
        signed = checker.signed_up_to
        unsigned = signed + 1 if signed is not None else result.first_seq or 1
        result.problem = (
            f"event {newest}, the last in the file, has no signed checkpoint, and "
            "every export ends with one: checkpoints were removed, or events "
            f"from {unsigned} on were changed or added after the file was written"
        )
        result.bad_seq = unsigned
        result.warnings.clear()
    return result


def last_hash(events: Iterable[StoredEvent]) -> str | None:
    found = None
    for stored in events:
        found = stored.hash
    return found
