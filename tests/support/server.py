"""Run a real `moorage serve` process for tests, and manage its accounts.

The server runs as a subprocess on a free loopback port, with its own data
directory and the database the test run uses (SQLite by default, PostgreSQL when
MOORAGE_TEST_DATABASE=postgresql). Accounts are created through the same admin
functions the command line uses, on the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from moorage import admin
from moorage.config import Settings
from moorage.services import Services, open_services
from tests.support.database import create_database, drop_database
from tests.support.terminal import Terminal

T = TypeVar("T")
ADMIN_LOGIN = "admin"
ADMIN_PASSWORD = "admin-test-password-1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unique(prefix: str) -> str:
    """Return a name that no other test in this run uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class ServerProcess:
    data_dir: Path
    database_url: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # The CA that signed the server's certificate, when it serves HTTPS.
    ca_file: Path | None = None
    # The server's working directory; None keeps the test's.
    cwd: Path | None = None
    # A terminal to be the server's stdin and controlling terminal; None
    # keeps the test's stdin and session.
    terminal: Terminal | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What httpx should verify the server with: the test CA, when there is one."""
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=self.ca_file)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("MOORAGE_")
        }
        env.update(
            MOORAGE_DATA_DIR=str(self.data_dir),
            MOORAGE_DATABASE_URL=self.database_url,
            MOORAGE_ADMIN_PASSWORD=ADMIN_PASSWORD,
            MOORAGE_LOG_FORMAT="json",
        )
        env.update(self.extra_env)
        return env

    def serve_command(self) -> list[str]:
        """Return the command that starts this server."""
        # -P, as the `moorage` script runs: the working directory is not on
        # sys.path.
        return [
            sys.executable,
            "-P",
            "-m",
            "moorage",
            "serve",
            "--port",
            str(self.port),
        ]

    def start(self, timeout: float = 30) -> None:
        options = self.terminal.popen_options() if self.terminal else {}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.serve_command(),
                env=self.environment(),
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                **options,  # type: ignore[arg-type]
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log_path}:\n{self.log()}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=1, verify=self.verify)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(
            f"server did not start within {timeout} s; see {self.log_path}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        workers = _children(self.process.pid)
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Kill the workers too, so that none outlives the test that
            # started it while it still tries to flush to a dropped database.
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def settings(self) -> Settings:
        # A server started with encryption off must not get keys, such as a
        # new signing key, sealed by an admin action run from the test.
        encryption = self.extra_env.get("MOORAGE_ENCRYPTION", "true") != "false"
        return Settings(
            data_dir=self.data_dir,
            database_url=self.database_url,
            encryption=encryption,
        )

    def run_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `moorage ARGS` against this server's data and database."""
        return subprocess.run(
            [sys.executable, "-m", "moorage", *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def run_admin(self, action: Callable[[Services], Awaitable[T]]) -> T:
        """Run one administrative action on the server's database."""

        async def main() -> T:
            services = await open_services(self.settings())
            try:
                return await action(services)
            finally:
                await services.close()

        return asyncio.run(main())

    def add_customer(self, slug: str | None = None) -> str:
        slug = slug or unique("cust")
        self.run_admin(lambda s: admin.add_customer(s.identity, slug, slug, None))
        return slug

    def add_user(
        self, customer: str, role: str, login: str | None = None
    ) -> tuple[str, str]:
        """Create a user and return (login, generated password)."""
        login = login or unique("user")
        created = self.run_admin(
            lambda s: admin.add_user(s.identity, customer, login, role)
        )
        assert created.password is not None
        return login, created.password


@contextmanager
def running_server(
    data_dir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start a registry on a new database under `data_dir`; stop and drop it after."""
    data_dir.mkdir(parents=True, exist_ok=True)
    process = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env=extra_env or {},
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
        drop_database(process.database_url)


def _children(pid: int) -> list[int]:
    """Return the child processes of `pid` (the workers of a supervisor)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
    return found
