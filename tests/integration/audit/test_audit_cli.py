"""`moorage audit list` filters and `moorage audit export` formats."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from moorage.db.audit_store import AuditFilter
from tests.support.audit import wait_for_events
from tests.support.oci_client import pull_image, push_image, small_image
from tests.support.server import ServerProcess, unique


def _moorage(server: ServerProcess, *arguments: str, check: bool = True) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env=server.environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if check:
        assert completed.returncode == 0, completed.stderr
    return completed.stdout


def _pulled_customer(server: ServerProcess) -> tuple[str, str]:
    customer = server.add_customer()
    login, password = server.add_user(customer, "writer")
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        push_image(client, f"{customer}/app", "1.0", small_image())
        pull_image(client, f"{customer}/app", "1.0")
    httpx.get(f"{server.url}/v2/", auth=(login, "wrong-password-xyz"))
    wait_for_events(
        server,
        AuditFilter(account=login, outcome="failure"),
        lambda found: len(found) == 1,
    )
    return customer, login


def test_list_filters(server: ServerProcess) -> None:
    """Each filter narrows the listing to matching events."""
    customer, login = _pulled_customer(server)

    def listed(*filters: str) -> list[dict[str, object]]:
        output = _moorage(
            server, "audit", "list", "--json", "--limit", "1000", *filters
        )
        return [json.loads(line) for line in output.splitlines()]

    pulls = listed("--customer", customer, "--action", "manifest.pull")
    assert len(pulls) == 1
    assert pulls[0]["actor_account"] == login
    assert len(listed("--account", login, "--action", "blob.*")) == 4
    failures = listed("--account", login, "--outcome", "failure")
    assert [event["action"] for event in failures] == ["auth.login"]
    assert (
        len(listed("--repository", f"{customer}/app", "--action", "manifest.push")) == 1
    )
    assert listed("--customer", customer, "--source", "192.0.2.1") == []
    assert len(listed("--customer", customer, "--source", "127.0.0.1")) >= 6
    assert len(listed("--customer", customer, "--source", "127.0.0.0/8")) >= 6
    assert listed("--customer", customer, "--source", "192.0.2.0/24") == []
    assert listed("--customer", customer, "--source", "::/0") == []
    assert listed("--customer", customer, "--until", "2000-01-01") == []
    assert len(listed("--customer", customer, "--since", "2000-01-01")) >= 6


def test_customer_filter_includes_changes_to_it(server: ServerProcess) -> None:
    """`--customer` lists the changes the vendor's operator made to that
    customer, and leaves out changes to other customers."""
    customer = unique("cust")
    other = unique("cust")
    for slug in (customer, other):
        _moorage(server, "customer", "add", slug)
        _moorage(server, "user", "add", slug, unique("user"))

    output = _moorage(
        server, "audit", "list", "--json", "--limit", "1000", "--customer", customer
    )

    events = [json.loads(line) for line in output.splitlines()]
    assert [event["action"] for event in events] == ["customer.add", "user.add"]
    assert {event["actor_account"].startswith("os:") for event in events} == {True}
    assert {event["actor_customer"] for event in events} == {None}
    assert {event["repository"] for event in events} == {f"{customer}/"}


def test_customer_filter_other_customers(server: ServerProcess) -> None:
    """`--customer` leaves another customer's denied request for the
    customer's repository out of list and export. `--include-other-customers`
    adds it."""
    customer, login = _pulled_customer(server)
    other = server.add_customer()
    prober, password = server.add_user(other, "writer")
    response = httpx.get(
        f"{server.url}/v2/{customer}/app/manifests/1.0", auth=(prober, password)
    )
    # Denied as not found, so that the repository's existence is not disclosed.
    assert response.status_code == 404
    probes = wait_for_events(
        server,
        AuditFilter(account=prober, repository=f"{customer}/app", outcome="failure"),
        lambda found: len(found) >= 1,
    )
    probe_seqs = {stored.seq for stored in probes}

    def listed(*arguments: str) -> list[dict[str, object]]:
        output = _moorage(
            server, "audit", "list", "--json", "--limit", "1000", *arguments
        )
        return [json.loads(line) for line in output.splitlines()]

    own = listed("--customer", customer)
    assert {event["actor_customer"] for event in own} <= {customer, None}
    assert probe_seqs.isdisjoint(event["seq"] for event in own)
    assert login in {event["actor_account"] for event in own}

    exported = _moorage(server, "audit", "export", "--customer", customer)
    assert prober not in exported
    assert login in exported

    wider = listed("--customer", customer, "--include-other-customers")
    assert probe_seqs <= {event["seq"] for event in wider}
    assert {event["seq"] for event in own} <= {event["seq"] for event in wider}

    wider_export = _moorage(
        server, "audit", "export", "--customer", customer, "--include-other-customers"
    )
    assert prober in wider_export


def test_other_customers_needs_customer(server: ServerProcess) -> None:
    """--include-other-customers without --customer is a usage error."""
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", "audit", "list", "--include-other-customers"],
        env=server.environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert "--include-other-customers needs --customer" in completed.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ("list", "--outcome", "maybe"),
            "error: invalid outcome 'maybe'; use success, failure, alert",
        ),
        (
            ("list", "--limit", str(2**63)),
            f"error: --limit must be at most {2**63 - 1}",
        ),
        (
            ("archive", "--older-than-days", str(10**12)),
            f"error: an age of {10**12} days reaches before the year 1; use a "
            "smaller number",
        ),
    ],
)
def test_usage_errors_one_line(
    server: ServerProcess, arguments: tuple[str, ...], message: str
) -> None:
    """A value out of range is a one-line usage error, not an empty table, a
    database error or a traceback."""
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", "audit", *arguments],
        env=server.environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    # Other lines are the warnings of the set-up (keys inside the data directory).
    lines = [line for line in completed.stderr.splitlines() if '"level"' not in line]
    assert lines == [message]
    assert completed.stdout == ""


@pytest.mark.parametrize("layout", [(), ("--wide",)])
def test_list_table_at_80_columns(
    server: ServerProcess, layout: tuple[str, ...]
) -> None:
    """At 80 columns both layouts keep logins and actions whole, give each
    column room, and fit the width."""
    customer, login = _pulled_customer(server)
    arguments = ["audit", "list", "--account", login, *layout]
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env={**server.environment(), "COLUMNS": "80"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert lines, "no table printed"
    assert max(len(line.rstrip()) for line in lines) <= 80
    header = " ".join(lines[:3])
    for word in ("seq", "time", "account", "action", "outcome", "target"):
        assert word in header
    for value in (login, "manifest.push", "manifest.pull", "auth.login", "failure"):
        assert value in completed.stdout
    # No column is squeezed to a few characters: a digest's first 12
    # hexadecimal digits stay on one line.
    assert re.search(r"sha256:[0-9a-f]{12}", completed.stdout)
    if layout:
        assert "source" in header
        assert customer in completed.stdout
        assert "127.0.0.1" in completed.stdout


def _with_closed_stdout(
    server: ServerProcess, *arguments: str
) -> subprocess.CompletedProcess[str]:
    """Run `moorage` with stdout on a pipe whose reader has already closed."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "moorage", *arguments],
            env=server.environment(),
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    "arguments",
    [("export",), ("export", "--format", "csv"), ("list", "--json"), ("list",)],
)
def test_closed_stdout_ends_quietly(
    server: ServerProcess, arguments: tuple[str, ...]
) -> None:
    """A reader that closes the pipe first (`| head`) ends the command with
    exit code 141 (128 + SIGPIPE), without a traceback or an error message."""
    _pulled_customer(server)
    completed = _with_closed_stdout(server, "audit", *arguments)
    assert completed.returncode == 141, completed.stderr
    # Other lines are the warnings of the set-up (keys inside the data directory).
    lines = [line for line in completed.stderr.splitlines() if '"level"' not in line]
    assert lines == []


def test_export_to_file_with_closed_stdout(
    server: ServerProcess, tmp_path: Path
) -> None:
    """With --output, a closed stdout loses only the closing note: the file is
    complete and verifies."""
    _pulled_customer(server)
    exported = tmp_path / "audit.jsonl"
    completed = _with_closed_stdout(
        server, "audit", "export", "--output", str(exported)
    )
    assert completed.returncode == 141, completed.stderr
    verified = _moorage(server, "audit", "verify", "--file", str(exported))
    assert "audit trail intact" in verified
    assert [path.name for path in tmp_path.iterdir()] == ["audit.jsonl"]


def test_export_formats(server: ServerProcess, tmp_path: Path) -> None:
    """A JSON lines export verifies on its own; CSV has one row per event."""
    customer, _ = _pulled_customer(server)
    jsonl = tmp_path / "audit.jsonl"
    _moorage(server, "audit", "export", "--output", str(jsonl))
    verified = _moorage(server, "audit", "verify", "--file", str(jsonl))
    assert "audit trail intact" in verified
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert records[0]["type"] == "header"
    assert records[-1]["type"] == "checkpoint"
    assert records[-1]["seq"] == records[0]["last_seq"]

    csv_path = tmp_path / "audit.csv"
    _moorage(
        server, "audit", "export", "--format", "csv", "--customer", customer,
        "--output", str(csv_path),
    )  # fmt: skip
    with csv_path.open(newline="") as source:
        rows = list(csv.DictReader(source))
    assert rows
    assert {row["actor_customer"] for row in rows} == {customer}
    assert "hash" in rows[0]

    tampered = tmp_path / "tampered.jsonl"
    lines = jsonl.read_text().splitlines()
    middle = json.loads(lines[2])
    middle["actor_account"] = "someone-else"
    lines[2] = json.dumps(middle)
    tampered.write_text("\n".join(lines) + "\n")
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", "audit", "verify", "--file", str(tampered)],
        env=server.environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1
    assert f"event {middle['seq']} was altered" in completed.stderr


def test_csv_export_neutralizes_formulas(server: ServerProcess, tmp_path: Path) -> None:
    """A login name chosen by an attacker lands in the CSV export as text: a
    leading quote before a formula, control characters escaped. (A Basic
    credential's user name cannot contain a colon.)"""
    names = ['=HYPERLINK("evil.example/x","click")', "@SUM(1+1)\nnext"]
    for name in names:
        httpx.get(f"{server.url}/v2/", auth=(name, "wrong-password-xyz"))
    for name in names:
        wait_for_events(
            server, AuditFilter(account=name), lambda found: len(found) == 1
        )
    csv_path = tmp_path / "audit.csv"
    _moorage(
        server, "audit", "export", "--format", "csv", "--action", "auth.login",
        "--outcome", "failure", "--output", str(csv_path),
    )  # fmt: skip
    with csv_path.open(newline="") as source:
        accounts = [row["actor_account"] for row in csv.DictReader(source)]
    assert "'" + names[0] in accounts
    assert "'@SUM(1+1)\\x0anext" in accounts
    for account in accounts:
        assert not account.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert len(csv_path.read_text().splitlines()) == len(accounts) + 1
