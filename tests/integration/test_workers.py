"""`workers` > 1: several server processes share the port and stop together."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from moorage.audit.events import SUCCESS, VENDOR_USER_ADD
from moorage.db.audit_store import AuditFilter
from tests.support.database import create_database, drop_database
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _start_server(
    tmp_path: Path,
    workers: str = "2",
    cwd: Path | None = None,
    environment: dict[str, str] | None = None,
    *,
    start: bool = True,
) -> ServerProcess:
    """Start a server with `workers` processes on a database of its own (or
    only set it up, without `start`)."""
    server = ServerProcess(
        data_dir=tmp_path / "data",
        database_url="",
        extra_env={"MOORAGE_WORKERS": workers, **(environment or {})},
        cwd=cwd,
    )
    server.data_dir.mkdir()
    server.database_url = create_database(server.data_dir)
    if start:
        server.start()
    return server


def _serves_health_then_stops(server: ServerProcess) -> None:
    """Check that `server` returns 200 for /healthz, then stop it and drop its
    database."""
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
        drop_database(server.database_url)


def test_workers_serve_and_stop_together(tmp_path: Path) -> None:
    """Two workers answer on one port, and SIGTERM to the parent stops both."""
    server = _start_server(tmp_path)
    try:
        assert server.process is not None
        workers = _children(server.process.pid)
        assert len(workers) == 2
        for pid in workers:
            # Forked from the interpreter that has not loaded the CLI.
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"moorage.prefork" in command
        with httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
        ) as client:
            statuses = {client.get("/v2/").status_code for _ in range(20)}
        assert statuses == {200}
    finally:
        server.stop()
        drop_database(server.database_url)
    assert server.process.returncode == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid)


def test_one_worker_serves_without_the_command_line(tmp_path: Path) -> None:
    """With one worker, `moorage serve` also replaces itself with the server
    interpreter that has not loaded the CLI, and serves in that process."""
    server = _start_server(tmp_path, workers="1")
    assert server.process is not None
    command = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().split(b"\0")
    children = _children(server.process.pid)
    _serves_health_then_stops(server)
    assert b"moorage.prefork" in command
    assert children == []


@pytest.mark.parametrize("workers", ["1", "2"])
def test_first_admin_is_audited(tmp_path: Path, workers: str) -> None:
    """The vendor admin created on the first start has its audit event, with one
    worker or several."""
    server = _start_server(tmp_path, workers=workers)
    try:
        events = server.run_admin(
            lambda services: services.audit.query(
                AuditFilter(action=VENDOR_USER_ADD), limit=10
            )
        )
    finally:
        server.stop()
        drop_database(server.database_url)
    assert len(events) == 1
    assert events[0].event.outcome == SUCCESS
    assert f"vendor user {ADMIN_LOGIN} as admin" in (events[0].event.reason or "")


def test_supervisor_logs_in_the_workers_format(tmp_path: Path) -> None:
    """With console logs, the supervisor's own lines are console lines too."""
    server = _start_server(tmp_path, environment={"MOORAGE_LOG_FORMAT": "console"})
    _serves_health_then_stops(server)
    stopped = [line for line in server.log().splitlines() if "stopped" in line]
    assert stopped, server.log()
    assert not stopped[-1].startswith("{"), stopped[-1]
    assert "[info     ] stopped" in stopped[-1]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_interrupt_while_serving_stops_cleanly(tmp_path: Path, workers: str) -> None:
    """SIGINT (Ctrl-C) to a serving server stops it like SIGTERM: the audit log
    is closed, and nothing is logged as an error."""
    server = _start_server(tmp_path, workers=workers)
    try:
        server.stop(signal.SIGINT)
    finally:
        drop_database(server.database_url)
    assert server.process is not None
    assert server.process.returncode in (0, -signal.SIGINT)
    log = server.log()
    assert "audit log closed" in log
    assert "Traceback" not in log
    assert '"level": "error"' not in log
    assert "interrupted" not in log


def test_workers_port_in_use_one_line(tmp_path: Path) -> None:
    """Several workers on a port that is taken: one error line, no traceback."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = ServerProcess(
            data_dir=tmp_path / "data",
            database_url="",
            extra_env={"MOORAGE_WORKERS": "2"},
            port=port,
        )
        server.data_dir.mkdir()
        server.database_url = create_database(server.data_dir)
        try:
            with pytest.raises(RuntimeError, match="server exited"):
                server.start()
        finally:
            drop_database(server.database_url)
    log = server.log()
    assert "Traceback" not in log
    assert f"error: cannot listen on 127.0.0.1:{port}:" in log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_leaves_first_start(tmp_path: Path, workers: str) -> None:
    """A first start on a port that is taken stops with one error line. It
    creates no data directory, schema or first admin, so the next start on a
    free port is a first start and creates the admin."""
    data_dir = tmp_path / "data"
    created = f"vendor admin {ADMIN_LOGIN!r} created with the given password"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = ServerProcess(
            data_dir=data_dir,
            database_url=create_database(data_dir),
            extra_env={"MOORAGE_WORKERS": workers},
            port=port,
            log_file=tmp_path / "server.log",
        )
        try:
            with pytest.raises(RuntimeError, match="server exited"):
                server.start()
        except BaseException:
            drop_database(server.database_url)
            raise
    failed_start = server.log()
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        failed_start
    )
    assert "Traceback" not in failed_start
    assert created not in failed_start
    assert not data_dir.exists()

    try:
        server.start()
        second_start = server.log()[len(failed_start) :]
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
        drop_database(server.database_url)
    assert second_start.count(created) == 1, second_start


def test_workers_ignore_modules_in_working_directory(tmp_path: Path) -> None:
    """A file in the working directory named like a module the server imports
    does not run in the re-executed parent, workers or supervisor."""
    directory = tmp_path / "cwd"
    directory.mkdir()
    for name in ("structlog", "uvicorn", "pickle"):
        (directory / f"{name}.py").write_text("raise SystemExit(3)\n")
    server = _start_server(tmp_path, cwd=directory)
    _serves_health_then_stops(server)
    assert server.process is not None
    assert server.process.returncode == 0


def test_workers_start_with_large_settings(tmp_path: Path) -> None:
    """Settings that pickle to more than a pipe's 64 KiB reach the workers."""
    networks = [f"10.{i // 256}.{i % 256}.0/24" for i in range(6000)]
    environment = {"MOORAGE_TRUSTED_PROXIES": json.dumps(networks)}
    server = _start_server(tmp_path, environment=environment)
    _serves_health_then_stops(server)
    assert server.process is not None
    assert server.process.returncode == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_without_tls_keeps_serving(tmp_path: Path, workers: str) -> None:
    """Without TLS, SIGHUP has no certificate to reload: the server logs it and
    goes on serving, with one worker or several."""
    server = _start_server(tmp_path, workers=workers)
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    time.sleep(1)
    still_running = server.process.poll() is None
    _serves_health_then_stops(server)
    assert still_running
    # One worker ends by the SIGTERM of `stop`, which uvicorn raises again
    # once it has shut down; the supervisor of several exits with 0.
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert "SIGHUP ignored" in server.log()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_while_starting_keeps_starting(tmp_path: Path, workers: str) -> None:
    """A SIGHUP that arrives while the server prepares the database, after the
    command line replaced itself, does not stop the start."""
    server = _start_server(tmp_path, workers=workers, start=False)
    sent = threading.Event()

    def hang_up() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not sent.is_set():
            process = server.process
            if process is not None:
                try:
                    command = Path(f"/proc/{process.pid}/cmdline").read_bytes()
                except FileNotFoundError:
                    return
                if b"moorage.prefork" in command:
                    process.send_signal(signal.SIGHUP)
                    sent.set()
            time.sleep(0.002)

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        server.start()
    finally:
        thread.join()
    _serves_health_then_stops(server)
    assert sent.is_set()


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def test_supervisor_checks_the_workers_passwords(tmp_path: Path) -> None:
    """The workers' argon2id checks run in the supervisor, whose peak memory
    grows by the 7 MiB of a check, and logins still succeed or fail."""
    server = _start_server(tmp_path)
    try:
        assert server.process is not None
        supervisor = server.process.pid
        before = _peak_rss_kib(supervisor)
        with httpx.Client(base_url=server.url) as client:
            right = client.get("/v2/", auth=(ADMIN_LOGIN, ADMIN_PASSWORD))
            wrong = client.get("/v2/", auth=(ADMIN_LOGIN, "not-the-password"))
            unknown = client.get("/v2/", auth=("nobody", "not-the-password"))
        assert (right.status_code, wrong.status_code, unknown.status_code) == (
            200,
            401,
            401,
        )
        assert _peak_rss_kib(supervisor) - before > 5 * 1024
    finally:
        server.stop()
        drop_database(server.database_url)
    assert server.process.returncode == 0


def test_long_passwords_leave_password_checks_working(tmp_path: Path) -> None:
    """Passwords far over any account's length fail as wrong ones, and the
    workers' password checks keep working after them. Each request opens its
    own connection, so that both workers get some."""
    server = _start_server(tmp_path)
    try:
        for index, length in enumerate((2_000, 45_000, 45_000, 45_000)):
            # A login of its own each time, so that the throttle stays out.
            login = f"nobody-{index}"
            long = httpx.get(f"{server.url}/v2/", auth=(login, '"' * length))
            assert long.status_code == 401
        # Over the 64 KiB limit of a request's head once in base64.
        too_long = httpx.get(f"{server.url}/v2/", auth=("nobody-4", '"' * 70_000))
        assert too_long.status_code == 431
        # Quotes unencoded, as curl --data-binary sends them: 40 KB of form,
        # 80 KB once escaped in JSON.
        form = "grant_type=password&service=moorage&username=nobody-5&password="
        response = httpx.post(
            f"{server.url}/token",
            content=(form + '"' * 40_000).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 401
        statuses = {
            httpx.get(
                f"{server.url}/v2/", auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
            ).status_code
            for _ in range(8)
        }
        assert statuses == {200}
    finally:
        server.stop()
        drop_database(server.database_url)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_workers_stop_when_parent_killed(tmp_path: Path) -> None:
    """Workers of a supervisor killed with SIGKILL stop instead of serving on."""
    server = _start_server(tmp_path)
    try:
        assert server.process is not None
        workers = _children(server.process.pid)
        assert len(workers) == 2
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        deadline = time.monotonic() + 30
        running = workers
        while running and time.monotonic() < deadline:
            time.sleep(0.2)
            running = [pid for pid in workers if _alive(pid)]
        assert running == []
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        drop_database(server.database_url)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid)


def _stall_upload(server: ServerProcess) -> socket.socket:
    """Start a blob upload and send a PATCH whose body never ends; return its socket."""
    auth = (ADMIN_LOGIN, ADMIN_PASSWORD)
    started = httpx.post(f"{server.url}/v2/vendor/stall/blobs/uploads/", auth=auth)
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    credentials = base64.b64encode(f"{ADMIN_LOGIN}:{ADMIN_PASSWORD}".encode())
    head = (
        f"PATCH {location} HTTP/1.1\r\n"
        f"Host: {server.address}\r\n"
        f"Authorization: Basic {credentials.decode()}\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(head.encode() + b"x" * 1000)
    return stalled


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stop_cancels_stalled_request(tmp_path: Path, workers: str) -> None:
    """SIGTERM stops the server within graceful_shutdown_seconds even while a
    client keeps a request open, and the audit log is closed."""
    server = _start_server(
        tmp_path,
        workers=workers,
        environment={"MOORAGE_GRACEFUL_SHUTDOWN_SECONDS": "2"},
    )
    assert server.process is not None
    stalled = _stall_upload(server)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not stop within 20 s of SIGTERM")
        assert time.monotonic() - started < 20
    finally:
        stalled.close()
        server.stop()
        drop_database(server.database_url)
    assert "audit log closed" in server.log()
