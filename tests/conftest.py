"""Fixtures shared by every test: a real server process and its database."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from tests.support.server import (
    ADMIN_LOGIN,
    ADMIN_PASSWORD,
    ServerProcess,
    running_server,
)

# Services opened inside the test process (admin helpers, the CLI runner) log
# through structlog; its default prints to stdout, which the CLI tests read.
# The server processes log to their own files, so this process keeps only
# critical messages, on the original stderr that no test replaces or closes.
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__),
)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One registry for the whole run; tests keep apart by using unique names."""
    # Every test connects from 127.0.0.1, so the per-address limit on failed
    # logins would let one test's wrong passwords throttle all the others.
    relaxed = {"MOORAGE_LOGIN_FREE_FAILURES_PER_ADDRESS": "100000"}
    with running_server(tmp_path_factory.mktemp("server"), relaxed) as process:
        yield process


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A registry of the test's own, for tests that restart or kill it."""
    with running_server(tmp_path / "data") as process:
        yield process


@pytest.fixture
def admin_client(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client that sends the vendor admin's Basic credentials."""
    with httpx.Client(
        base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
    ) as client:
        yield client
