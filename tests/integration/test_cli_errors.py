"""How `moorage` commands report failures: one line on stderr and a non-zero
exit code, never a traceback, and nothing changed when the command says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.audit import REJECTED, reject_audit_events
from tests.support.cli import Cli
from tests.support.database import create_database, drop_database


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """A data directory and database of the test's own, with the customer acme."""
    url = create_database(tmp_path)
    runner = Cli(tmp_path, url)
    runner.ok("customer", "add", "acme")
    yield runner
    drop_database(url)


def run_moorage(cli: Cli, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run a command in its own interpreter, so that stderr is what users see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(cli.env)
    return subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_database_error_one_line(cli: Cli) -> None:
    """A database error is one line that says nothing changed, not a traceback."""
    reject_audit_events(cli.env["MOORAGE_DATABASE_URL"], "grant.add")
    completed = run_moorage(cli, "grant", "add", "acme", "products/*", "reader")
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    # Other lines are JSON log lines written while the services open.
    lines = [line for line in completed.stderr.splitlines() if '"level"' not in line]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: database error: ")
    assert REJECTED in lines[0]
    assert "nothing was changed" in lines[0]
    assert "products/*" not in cli.ok("grant", "list", "acme")


def test_database_error_traceback_at_debug(cli: Cli) -> None:
    """With MOORAGE_LOG_LEVEL=debug the traceback is logged as well."""
    reject_audit_events(cli.env["MOORAGE_DATABASE_URL"], "grant.add")
    cli.env["MOORAGE_LOG_LEVEL"] = "debug"
    completed = run_moorage(cli, "grant", "add", "acme", "products/*", "reader")
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr
    assert "error: database error: " in completed.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:1/moorage", "127.0.0.1/moorage?port=1"])
def test_unreachable_database_one_line(cli: Cli, address: str) -> None:
    """A PostgreSQL server that does not answer is one line naming its
    address, without the password or a traceback; the port may be in the
    URL's query, as asyncpg allows."""
    cli.env["MOORAGE_DATABASE_URL"] = (
        f"postgresql+asyncpg://moorage:hunter2-secret@{address}"
    )
    completed = run_moorage(cli, "customer", "list")
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "hunter2-secret" not in completed.stderr
    lines = [line for line in completed.stderr.splitlines() if '"level"' not in line]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: cannot connect to the database at 127.0.0.1:1")


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("127.0.0.1:1", "127.0.0.1:1"),
        ("[::1]:1", "[::1]:1"),
        ("no-such-host.invalid", "no-such-host.invalid:default port"),
    ],
)
def test_serve_unreachable_database_one_line(
    cli: Cli, workers: str, host: str, shown: str
) -> None:
    """`moorage serve` with a PostgreSQL server that cannot be reached stops
    with the line that other commands print, not a traceback, with one worker
    or several."""
    cli.env["MOORAGE_DATABASE_URL"] = (
        f"postgresql+asyncpg://moorage:hunter2-secret@{host}/moorage"
    )
    cli.env["MOORAGE_WORKERS"] = workers
    completed = run_moorage(cli, "serve", "--port", "0")
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "hunter2-secret" not in completed.stderr
    lines = [line for line in completed.stderr.splitlines() if '"level"' not in line]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"error: cannot connect to the database at {shown}: ")


def _serve_environment(cli: Cli, workers: str) -> dict[str, str]:
    """Return the environment of `moorage serve` for the CLI's installation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(cli.env)
    env["MOORAGE_WORKERS"] = workers
    return env


def _start_serve(
    env: dict[str, str], *, start_new_session: bool = False
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "moorage", "serve", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=start_new_session,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_interrupted_while_starting(cli: Cli, workers: str) -> None:
    """Ctrl-C at any moment of `moorage serve`'s start stops it without a
    traceback: while the modules load, while the database is prepared, or once
    uvicorn handles the signal."""
    env = _serve_environment(cli, workers)
    for delay in (0.2, 0.6, 1.0, 1.5, 2.5):
        process = _start_serve(env)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert "Traceback" not in stderr, (delay, stderr)
        # 130 from Moorage, 1 from Click ("Aborted!"), -SIGINT from Python's
        # default handler, or 0 once uvicorn shut down cleanly.
        assert process.returncode in (0, 1, 130, -signal.SIGINT), (delay, stderr)


INTERRUPT_HOOK = Path(__file__).parent / "interrupt_hook"


@pytest.mark.parametrize(
    ("workers", "fork"),
    [
        ("1", 1),  # the child that prepares the database
        ("2", 1),
        ("2", 3),  # the second worker
    ],
)
def test_serve_interrupted_at_fork(cli: Cli, workers: str, fork: int) -> None:
    """A Ctrl-C that arrives while the server forks stops it: the signal is not
    lost in os.fork's callbacks, and no process of the server stays behind."""
    env = _serve_environment(cli, workers)
    env["MOORAGE_TEST_SIGNAL_AT_FORK"] = f"{fork}:SIGINT"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(INTERRUPT_HOOK), env.get("PYTHONPATH")])
    )
    process = _start_serve(env, start_new_session=True)

    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    assert process.returncode in (1, 130, -signal.SIGINT), stderr

    # The child that prepares the database may finish its work after the
    # parent stopped; then nothing of the server may be left.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("a process of the interrupted server was still running")


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_audit_list_limit_below_one(cli: Cli, limit: str) -> None:
    """audit list rejects a limit below 1 instead of listing every event."""
    result = cli.run("audit", "list", "--limit", limit)
    assert result.returncode == 2
    assert "--limit" in result.stderr


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        ("missing/x.jsonl", "missing does not exist"),
        (".", "it is a directory"),
    ],
)
def test_export_unwritable_output(
    cli: Cli, tmp_path: Path, output: str, problem: str
) -> None:
    """`audit export --output` to a missing directory or onto a directory is
    one line naming the path and the cause, and writes nothing."""
    target = tmp_path / output
    before = sorted(tmp_path.rglob("*"))
    completed = run_moorage(cli, "audit", "export", "--output", str(target))
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"error: cannot write {target}")
    assert problem in lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_archive_unwritable_directory(cli: Cli, tmp_path: Path) -> None:
    """`audit archive --dir` to a directory that cannot be created is one line,
    and the events stay in the database."""
    completed = run_moorage(
        cli, "audit", "archive", "--older-than-days", "0", "--dir", "/proc/nope"
    )
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    lines = [line for line in completed.stderr.splitlines() if '"level"' not in line]
    assert len(lines) == 1, completed.stderr
    assert "/proc/nope" in lines[0]
    assert "no events removed" in lines[0]
    assert "No such file or directory" in lines[0]
    verified = run_moorage(cli, "audit", "verify")
    assert "audit trail intact: 1 events" in verified.stdout


def test_export_replaces_file_whole(cli: Cli, tmp_path: Path) -> None:
    """An export to an existing file replaces it and leaves no temporary file."""
    target = tmp_path / "audit.jsonl"
    target.write_text("old\n")
    completed = run_moorage(cli, "audit", "export", "--output", str(target))
    assert completed.returncode == 0, completed.stderr
    assert target.read_text().startswith('{"type":"header"')
    assert [path.name for path in tmp_path.glob(".audit.jsonl.*")] == []


def _listed_seqs(output: str) -> list[int]:
    return [json.loads(line)["seq"] for line in output.splitlines()]


def test_audit_list_cut_notice(cli: Cli) -> None:
    """`audit list` says on stderr when --limit cut the list, and
    --newest-first lists the newest events first."""
    cli.ok("customer", "add", "bravo")
    cli.ok("customer", "add", "charlie")
    oldest = cli.run("audit", "list", "--json", "--limit", "2")
    assert oldest.returncode == 0, oldest.stderr
    assert _listed_seqs(oldest.stdout) == [1, 2]
    assert "more events match; these are the 2 oldest" in oldest.stderr
    assert "--newest-first" in oldest.stderr
    newest = cli.run("audit", "list", "--json", "--limit", "2", "--newest-first")
    assert _listed_seqs(newest.stdout) == [3, 2]
    assert "these are the 2 newest" in newest.stderr
    whole = cli.run("audit", "list", "--json", "--limit", "3")
    assert _listed_seqs(whole.stdout) == [1, 2, 3]
    assert whole.stderr == ""


def test_audit_list_no_match_message(cli: Cli) -> None:
    """`audit list` with filters that match nothing says so on stderr and
    exits with 0; the table is left out and `--json` prints no line."""
    for layout in ((), ("--wide",), ("--json",)):
        result = cli.run("audit", "list", "--customer", "nosuch", *layout)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert result.stderr == "no audit events match the filters\n"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--action", "manifest.pul", "unknown action 'manifest.pul'"),
        ("--action", "bogus*", "unknown action 'bogus*'"),
        (
            "--source",
            "nope",
            "invalid --source 'nope': not an IP address or network; give an "
            "address such as 203.0.113.7",
        ),
        ("--source", "10.0.0.0/33", "invalid --source '10.0.0.0/33': not a network"),
        ("--source", "2001:db8::/129", "invalid --source '2001:db8::/129': not a"),
        (
            "--source",
            "127.0.0.1/8",
            "invalid --source '127.0.0.1/8': host bits are set; give the network "
            "127.0.0.0/8, or the address 127.0.0.1",
        ),
        (
            "--source",
            "2001:db8::1/32",
            "invalid --source '2001:db8::1/32': host bits are set; give the network "
            "2001:db8::/32, or the address 2001:db8::1",
        ),
    ],
)
def test_audit_list_bad_filter(cli: Cli, option: str, value: str, message: str) -> None:
    """An unknown action, a source that is not an address or network, or a
    network with host bits set is an error, not an empty table."""
    for command in ("list", "export"):
        result = cli.run("audit", command, option, value)
        assert result.returncode == 2
        assert message in result.stderr
        assert result.stdout == ""


def test_audit_list_known_filters(cli: Cli) -> None:
    """Known actions, prefixes, alert actions and addresses are accepted."""
    for option, value in [
        ("--action", "customer.add"),
        ("--action", "user.*"),
        ("--action", "alert.failed_logins"),
        ("--action", "key.rotate.start"),
        ("--source", "127.0.0.1"),
        ("--source", "2001:db8::1"),
        ("--source", "10.0.0.0/8"),
        ("--source", "2001:db8::/32"),
    ]:
        result = cli.run("audit", "list", option, value)
        assert result.returncode == 0, result.stderr
