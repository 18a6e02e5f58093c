"""Buffered log lines and request ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from collections.abc import Iterator

import pytest
import structlog

from moorage.api.middleware import RequestIds
from moorage.logs import (
    FLUSH_SECONDS,
    BufferedLineLogger,
    StandardLibraryHandler,
    connection_logger,
)


def test_logger_outside_loop_writes_at_once() -> None:
    out = io.StringIO()
    logger = BufferedLineLogger(out)
    logger.msg("first")
    assert out.getvalue() == "first\n"


def test_logger_in_loop_writes_in_batches() -> None:
    out = io.StringIO()
    logger = BufferedLineLogger(out)

    async def log_lines() -> tuple[str, str]:
        logger.info("one")
        logger.info("two")
        before = out.getvalue()
        await asyncio.sleep(FLUSH_SECONDS * 3)
        return before, out.getvalue()

    before, after = asyncio.run(log_lines())
    assert before == ""
    assert after == "one\ntwo\n"


def test_logger_warning_writes_at_once() -> None:
    out = io.StringIO()
    logger = BufferedLineLogger(out)

    async def log_lines() -> str:
        logger.info("before")
        logger.warning("warned")
        return out.getvalue()

    assert asyncio.run(log_lines()) == "before\nwarned\n"


def test_logger_flush_writes_pending_lines() -> None:
    out = io.StringIO()
    logger = BufferedLineLogger(out)

    async def log_and_flush() -> str:
        logger.info("pending")
        logger.flush()
        return out.getvalue()

    assert asyncio.run(log_and_flush()) == "pending\n"


@pytest.fixture
def json_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A standard library logger whose records go to a StandardLibraryHandler
    that writes JSON lines into the returned buffer."""
    out = io.StringIO()
    handler = StandardLibraryHandler(
        BufferedLineLogger(out), structlog.processors.JSONRenderer()
    )
    logger = logging.getLogger("moorage.test.standard_library")
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def test_standard_library_record_json(
    json_lines: tuple[logging.Logger, io.StringIO],
) -> None:
    """A standard library record becomes one JSON line with the logger name and
    level, and without extra fields other than the source address."""
    logger, out = json_lines
    logger.warning("bad %s", "request", extra={"authorization": "Basic c2VjcmV0"})
    entry = json.loads(out.getvalue())
    assert entry["event"] == "bad request"
    assert entry["logger"] == "moorage.test.standard_library"
    assert entry["level"] == "warning"
    assert "authorization" not in entry
    assert "c2VjcmV0" not in out.getvalue()


def test_connection_logger_adds_source_address(
    json_lines: tuple[logging.Logger, io.StringIO],
) -> None:
    """A connection's logger adds the client's host as `source_address` and
    has the `level` that uvicorn reads."""
    logger, out = json_lines
    adapter = connection_logger(logger, ("203.0.113.7", 50000))
    assert adapter.level == logger.level
    adapter.warning("Invalid HTTP request received.")
    entry = json.loads(out.getvalue())
    assert entry["source_address"] == "203.0.113.7"
    assert connection_logger(logger, None) is logger


def test_request_ids_unique_hex() -> None:
    ids = RequestIds()
    made = [ids.new() for _ in range(1000)]
    assert len(set(made)) == len(made)
    for request_id in made[:3]:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)


def test_request_ids_differ_after_fork() -> None:
    ids = RequestIds()
    parent_id = ids.new()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, ids.new().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_id) == 32
    assert child_id[:16] != parent_id[:16]
