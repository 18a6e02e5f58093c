"""`moorage audit list|verify|export|archive` and `moorage usage report`."""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, NoReturn, TextIO

import typer
from rich import box

from moorage.audit import files
from moorage.audit.events import AuditEvent, StoredEvent, is_known_action
from moorage.audit.usage import usage_report
from moorage.audit.verify import Verification
from moorage.cli.main import (
    DataDirOption,
    _parse_date,
    _run,
    _settings,
    console,
    errors,
)
from moorage.cli.output import Table, lines_cell, shown
from moorage.db.audit_store import ArchiveConflictError, AuditFilter
from moorage.db.schema import utcnow
from moorage.services import Services

audit_app: typer.Typer = typer.Typer(
    help="List, verify, export and archive the audit trail.", no_args_is_help=True
)
usage_app: typer.Typer = typer.Typer(
    help="Report usage per customer.", no_args_is_help=True
)

CustomerOption = Annotated[
    str | None,
    typer.Option(
        help="Customer (its short name): events of its accounts, and events in its "
        "namespace by no other customer, such as changes made to it and requests "
        "by vendor accounts."
    ),
]
OtherCustomersOption = Annotated[
    bool,
    typer.Option(
        "--include-other-customers",
        help="With --customer: also events in its namespace by other customers' "
        "accounts, such as their denied requests for its repositories.",
    ),
]
AccountOption = Annotated[str | None, typer.Option(help="Account login.")]
RepositoryOption = Annotated[str | None, typer.Option(help="Repository name.")]


def _check_action(value: str | None) -> str | None:
    if value is not None and not is_known_action(value):
        errors.print(
            f"[red]error:[/red] unknown action {shown(repr(value))}; use an action "
            "such as manifest.pull or auth.login, or a prefix with * such as "
            "'user.*' (docs/audit.md lists every action)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    return value


ActionOption = Annotated[
    str | None,
    typer.Option(
        help="Action, such as manifest.pull; a trailing * matches a prefix.",
        callback=_check_action,
    ),
]
# The outcomes an event can have: requests and changes succeed or fail, and the
# detectors in moorage.audit.alerts record "alert".
OUTCOMES = ("success", "failure", "alert")


def _check_outcome(value: str | None) -> str | None:
    if value is not None and value not in OUTCOMES:
        errors.print(
            f"[red]error:[/red] invalid outcome {value!r}; use " + ", ".join(OUTCOMES),
            highlight=False,
        )
        raise typer.Exit(2)
    return value


# The largest LIMIT both databases take: a signed 64-bit integer.
MAX_LIMIT = 2**63 - 1


def _check_limit(value: int) -> int:
    if value > MAX_LIMIT:
        errors.print(
            f"[red]error:[/red] --limit must be at most {MAX_LIMIT}", soft_wrap=True
        )
        raise typer.Exit(2)
    return value


OutcomeOption = Annotated[
    str | None,
    typer.Option(
        metavar="[success|failure|alert]",
        help="Only events with this outcome.",
        callback=_check_outcome,
    ),
]


def _check_source(value: str | None) -> str | None:
    """Return the address or network in the form events store it, or exit."""
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_network(value))
    except ValueError:
        pass
    errors.print(
        f"[red]error:[/red] invalid --source {shown(repr(value))}: "
        f"{shown(_source_problem(value))}",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(2)


def _source_problem(value: str) -> str:
    """Describe why `value` is neither an IP address nor a network."""
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        problem = "not a network" if "/" in value else "not an IP address or network"
        return (
            f"{problem}; give an address such as 203.0.113.7 or 2001:db8::1, or a "
            "network such as 10.0.0.0/8 or 2001:db8::/32"
        )
    # A network with host bits set (127.0.0.1/8) may mean either; name both.
    address = value.partition("/")[0]
    return f"host bits are set; give the network {network}, or the address {address}"


SourceOption = Annotated[
    str | None,
    typer.Option(
        "--source",
        help="Source IP address, or a network in CIDR form (10.0.0.0/8).",
        callback=_check_source,
    ),
]
SinceOption = Annotated[
    str | None, typer.Option(help="From this time (ISO 8601, UTC if no zone).")
]
UntilOption = Annotated[
    str | None, typer.Option(help="Before this time (ISO 8601, UTC if no zone).")
]


def _filter(
    customer: str | None,
    account: str | None,
    repository: str | None,
    action: str | None,
    outcome: str | None,
    source: str | None,
    since: str | None,
    until: str | None,
    other_customers: bool = False,
) -> AuditFilter:
    if other_customers and customer is None:
        errors.print(
            "[red]error:[/red] --include-other-customers needs --customer; add "
            "--customer NAME",
            highlight=False,
        )
        raise typer.Exit(2)
    # `_check_source` has already turned `source` into an address or a network.
    is_network = source is not None and "/" in source
    return AuditFilter(
        customer=customer,
        other_customers=other_customers,
        account=account,
        repository=repository,
        action=action,
        outcome=outcome,
        source_address=None if is_network else source,
        source_network=source if is_network else None,
        since=_parse_date(since),
        until=_parse_date(until),
    )


@audit_app.command("list")
def audit_list(
    customer: CustomerOption = None,
    other_customers: OtherCustomersOption = False,
    account: AccountOption = None,
    repository: RepositoryOption = None,
    action: ActionOption = None,
    outcome: OutcomeOption = None,
    source: SourceOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[
        int,
        typer.Option(
            min=1, callback=_check_limit, help="Maximum number of events to show."
        ),
    ] = 100,
    newest_first: Annotated[
        bool,
        typer.Option(
            "--newest-first",
            help="Show the newest matching events, newest first.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON lines instead of a table.")
    ] = False,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide",
            help="Show every column: customer, source, reason and full digests.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """List audit events, oldest first (or newest first with --newest-first).

    The table shows the columns that fit an 80-column terminal, wrapping long
    values. `--wide` adds the rest, and `--json` prints every field. When more
    events match than --limit, or none, it prints a note on stderr.
    """
    where = _filter(
        customer,
        account,
        repository,
        action,
        outcome,
        source,
        since,
        until,
        other_customers,
    )
    # One event more than the limit shows whether the limit cut the list.
    found = _run(
        _settings(data_dir=data_dir),
        lambda s: s.audit.query(
            where, min(limit + 1, MAX_LIMIT), newest_first=newest_first
        ),
    )
    cut = len(found) > limit
    found = found[:limit]
    if not found:
        # On stderr, so that `--json` output stays a valid, empty JSON lines file.
        message = "no audit events match the filters"
        if where == AuditFilter():
            message = "the audit trail has no events"
        errors.print(message, highlight=False)
    elif as_json:
        for stored in found:
            print(json.dumps(stored.to_dict(), separators=(",", ":")))
    else:
        console.print(_event_table(found, wide))
    if cut:
        _print_cut_notice(limit, newest_first)


def _print_cut_notice(limit: int, newest_first: bool) -> None:
    end = "newest" if newest_first else "oldest"
    other = "" if newest_first else ", --newest-first for the latest ones"
    errors.print(
        f"note: more events match; these are the {limit} {end}. Use "
        f"--limit for more, --since and --until to narrow the range{other}.",
        highlight=False,
        soft_wrap=True,
    )


def _event_table(found: list[StoredEvent], wide: bool) -> Table:
    """Build the `audit list` table, readable at 80 columns in both layouts.

    Each row takes two lines or more: the date above the time of day, the
    outcome below the action. `--wide` adds lines, not columns: the customer
    and source address below the account, the full digest and the reason
    below the target. Long values wrap instead of being cut (only the narrow
    table shortens digests, see `_target`), and there are no vertical
    borders, to leave room for the text.
    """
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("seq", no_wrap=True)
    table.add_column("time", min_width=10, max_width=10, overflow="fold")
    # Logins, repository names and digests have no spaces to break at: fold them.
    actor = "account\ncustomer\nsource" if wide else "account"
    table.add_column(actor, overflow="fold", ratio=2, min_width=12)
    table.add_column("action\noutcome", no_wrap=True)
    table.add_column("target", overflow="fold", ratio=3)
    for stored in found:
        event = stored.event
        table.add_row(
            str(stored.seq),
            event.time.strftime("%Y-%m-%d %H:%M:%S"),
            lines_cell(*_actor(event, wide)),
            lines_cell(event.action, event.outcome),
            lines_cell(*_target(event, wide)),
        )
    return table


def _actor(event: AuditEvent, wide: bool) -> list[str]:
    """Return who acted: the account, and in the wide table its customer and
    the source address on lines of their own."""
    if not wide:
        return [event.actor_account or "-"]
    return [
        event.actor_account or "-",
        event.actor_customer or "-",
        event.source_address or "-",
    ]


def _target(event: AuditEvent, wide: bool) -> list[str]:
    """Return what an event acted on: its repository, then its tag or digest,
    then the reason.

    The narrow table shows a digest by its first 12 hexadecimal digits, as
    `docker images` does, and only when there is no tag, and the reason in
    brackets; the wide table shows the tag and the full digest, and the reason
    on a line of its own.
    """
    if wide:
        parts = [event.repository, event.reference, event.digest]
    else:
        reference = event.reference
        if not reference and event.digest:
            reference = _short_digest(event.digest)
        parts = [event.repository, reference]
    target = " ".join(part for part in parts if part) or "-"
    if event.reason and wide:
        return [target, event.reason]
    if event.reason:
        return [f"{target} ({event.reason})"]
    return [target]


def _short_digest(digest: str) -> str:
    algorithm, separator, encoded = digest.partition(":")
    if not separator or len(encoded) <= 12:
        return digest
    return f"{algorithm}:{encoded[:12]}…"


@audit_app.command("verify")
def audit_verify(
    file: Annotated[
        Path | None,
        typer.Option(help="Verify this JSON lines export instead of the database."),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(help="JWKS file with the keys that signed the checkpoints."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Check the hash chain and signed checkpoints; name the first bad event."""
    if file is not None:
        try:
            export = files.read_export(file)
            jwks = json.loads(keys.read_text()) if keys else None
        except (OSError, ValueError) as error:
            errors.print(f"[red]error:[/red] {error}")
            raise typer.Exit(2) from None
        result = files.verify_export(export, jwks)
    else:
        result = _run(_settings(data_dir=data_dir), lambda s: s.audit.verify())
    _report_verification(result)


def _report_verification(result: Verification) -> None:
    if not result.ok:
        errors.print(f"[red]audit trail verification failed:[/red] {result.problem}")
        raise typer.Exit(1)
    span = (
        f"events {result.first_seq}-{result.last_seq}"
        if result.first_seq is not None
        else "no events"
    )
    console.print(
        f"audit trail intact: {result.events} events ({span}), "
        f"{result.checkpoints} signed checkpoints verified"
    )
    for warning in result.warnings:
        console.print(f"[yellow]note:[/yellow] {warning}")


@contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    """Yield stdout, or a temporary file beside `path` that replaces `path`
    only when the block completes, so a failed export leaves no partial file."""
    if path is None:
        yield sys.stdout
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("x", encoding="utf-8", newline="") as out:
            yield out
        os.replace(temporary, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)


def _check_output_path(path: Path) -> None:
    """Exit with one line when `path` cannot be an output file."""
    problem = None
    if path.is_dir():
        problem = "it is a directory"
    elif not path.parent.is_dir():
        problem = f"directory {path.parent} does not exist"
    elif not os.access(path.parent, os.W_OK):
        problem = f"directory {path.parent} is not writable"
    if problem is not None:
        errors.print(
            f"[red]error:[/red] cannot write {shown(path)}: {problem}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)


def _exit_for_file_error(action: str, error: OSError) -> NoReturn:
    """Print a failed file operation as one line and exit with code 1."""
    where = f" {error.filename}" if error.filename else ""
    errors.print(
        f"[red]error:[/red] {action}{shown(where)}: {error.strerror or error}",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


@audit_app.command("export")
def audit_export(
    output_format: Annotated[
        str, typer.Option("--format", help="jsonl (verifiable) or csv.")
    ] = "jsonl",
    output: Annotated[
        Path | None, typer.Option(help="Write to this file. Default: stdout.")
    ] = None,
    customer: CustomerOption = None,
    other_customers: OtherCustomersOption = False,
    account: AccountOption = None,
    repository: RepositoryOption = None,
    action: ActionOption = None,
    outcome: OutcomeOption = None,
    source: SourceOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Export events as JSON lines (with signed checkpoints) or CSV.

    Only an unfiltered range (time filters alone) verifies as a chain, because
    a filtered export leaves out events in between.
    """
    if output_format not in {"jsonl", "csv"}:
        errors.print(
            f"[red]error:[/red] invalid format {output_format!r}: use jsonl or csv"
        )
        raise typer.Exit(2)
    where = _filter(
        customer,
        account,
        repository,
        action,
        outcome,
        source,
        since,
        until,
        other_customers,
    )
    if output is not None:
        _check_output_path(output)

    async def export(services: Services) -> int:
        with _output(output) as out:
            if output_format == "csv":
                return await services.audit.export_csv(out, where)
            return await services.audit.export_jsonl(out, where)

    try:
        count = _run(_settings(data_dir=data_dir), export)
    except BrokenPipeError:
        raise  # stdout closed; the root command ends quietly
    except OSError as error:
        _exit_for_file_error("export failed, nothing written: cannot write", error)
    if output is not None:
        console.print(f"{count} events written to {output}")


@audit_app.command("archive")
def audit_archive(
    older_than_days: Annotated[
        int, typer.Option("--older-than-days", min=0, help="Age in days.")
    ],
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Archive directory. Default: audit_archive_dir."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Move events older than the given age to a file, then delete them."""
    settings = _settings(data_dir=data_dir)
    target = directory or settings.resolved_audit_archive_dir
    try:
        cutoff = utcnow() - timedelta(days=older_than_days)
    except OverflowError:
        errors.print(
            f"[red]error:[/red] an age of {older_than_days} days reaches before "
            "the year 1; use a smaller number",
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    try:
        path = _run(settings, lambda s: s.audit.archive(cutoff, target), atomic=False)
    except OSError as error:
        _exit_for_file_error("archive failed, no events removed: cannot write", error)
    except ArchiveConflictError as error:
        console.print(f"nothing archived: {error}")
        return
    if path is None:
        console.print("no events old enough to archive")
    else:
        console.print(f"archived to {path}")


@usage_app.command("report")
def usage_report_command(
    since: SinceOption = None,
    until: UntilOption = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Pulls, pushes and bytes per customer per day, from the audit trail."""
    start, end = _parse_date(since), _parse_date(until)
    rows = _run(
        _settings(data_dir=data_dir),
        lambda s: usage_report(s.audit.store, start, end),
    )
    columns = (
        "day",
        "customer",
        "pulls",
        "blob_downloads",
        "pushes",
        "bytes_out",
        "bytes_in",
    )
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for row in rows:
            files.write_csv_cells(writer, row.values())
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    console.print(table)
