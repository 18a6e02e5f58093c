"""structlog configuration: JSON lines when not on a terminal, colour otherwise."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
from typing import Any, TextIO

import structlog

# How long a log line may wait in memory before it is written. The registry
# writes one line per request, and writing each on its own costs a system call
# per request. A process killed with SIGKILL loses at most this much of its log.
FLUSH_SECONDS = 0.1


class BufferedLineLogger:
    """A structlog logger that writes debug and info lines in batches.

    Inside a running event loop, the first such line after a write schedules
    the next write FLUSH_SECONDS later; outside one (the command line, other
    threads) each line is written at once. A warning or error is written at
    once, after the lines before it. Remaining lines are written at
    interpreter exit.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._scheduled = False
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        with self._lock:
            self._lines.append(message + "\n")
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._scheduled = True
                loop.call_later(FLUSH_SECONDS, self.flush)
                return
        self.flush()

    debug = info = msg

    def write_now(self, message: str) -> None:
        with self._lock:
            self._lines.append(message + "\n")
        self.flush()

    log = warn = warning = error = err = critical = exception = write_now
    fatal = failure = write_now

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            self._scheduled = False
        if not lines:
            return
        try:
            self._file.write("".join(lines))
            self._file.flush()
        except (OSError, ValueError):
            # A closed or broken stderr: there is nowhere left to report it.
            pass


_logger: BufferedLineLogger | None = None


def flush_logs() -> None:
    """Write every buffered log line now (before a fork or an `os._exit`)."""
    if _logger is not None:
        _logger.flush()


def _reset_after_fork() -> None:
    # Another thread may have held the lock when the process forked.
    if _logger is not None:
        _logger._lock = threading.Lock()
        _logger._scheduled = False


# A forked child must not inherit unwritten lines, or both processes write them.
os.register_at_fork(before=flush_logs, after_in_child=_reset_after_fork)


class StandardLibraryHandler(logging.Handler):
    """Logging handler that writes the records of standard library loggers
    (uvicorn's, asyncio's) in structlog's format, through the same buffered
    logger.

    Of a record's extra fields only `source_address` is written (see
    `connection_logger`), because others may contain anything a library put in.
    """

    def __init__(self, logger: BufferedLineLogger, renderer: Any) -> None:
        super().__init__()
        self._logger = logger
        self.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[
                    structlog.stdlib.add_logger_name,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.stdlib.ExtraAdder(allow=["source_address"]),
                ],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    renderer,
                ],
            )
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a log call never raises, as in logging
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._logger.write_now(line)
        else:
            self._logger.msg(line)


class _ConnectionLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds a connection's source address to each record."""

    @property
    def level(self) -> int:
        # uvicorn reads `logger.level`, which LoggerAdapter does not have.
        return self.logger.level


def connection_logger(
    logger: logging.Logger, client: tuple[str, int] | None
) -> logging.Logger:
    """Wrap `logger` so that each record gets the host of `client`, a (host,
    port) pair or None, as its `source_address` field."""
    if client is None:
        return logger
    adapter = _ConnectionLogger(logger, {"source_address": client[0]})
    # uvicorn's protocol types its `logger` as Logger. The adapter has the
    # methods it calls, and `level`.
    return adapter  # type: ignore[return-value]


def configure_logging(level: str = "info", log_format: str = "auto") -> None:
    global _logger
    use_json = log_format == "json" or (
        log_format == "auto" and not sys.stderr.isatty()
    )
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer()
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    logger = BufferedLineLogger(sys.stderr)
    flush_logs()
    _logger = logger

    def logger_factory(*_args: Any) -> BufferedLineLogger:
        return logger

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StandardLibraryHandler)]:
        root.removeHandler(handler)
    root.addHandler(StandardLibraryHandler(logger, renderer))
    root.setLevel(max(numeric_level, logging.WARNING))
