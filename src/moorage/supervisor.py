"""Wait for the worker processes of `moorage serve` and stop them together.

`python -m moorage.supervisor [--password-slots=N --password-sockets=FD,...]
PID...` is what the parent of the workers turns into (with exec) once it has
forked them, so the process that only waits uses about 12 MiB instead of the
whole application's 90 MiB. That is why this module imports nothing outside
the standard library (argon2-cffi only at the first password request) and
writes its few log lines as JSON itself. SIGTERM or SIGINT is passed on to
every worker, which finishes its requests and stops. SIGHUP is passed on too,
and workers serving TLS load their certificate again. When one worker exits,
the others are stopped. On the inherited password sockets it hashes and checks
passwords for the workers (see moorage.auth.password_service).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from moorage.auth import password_service

# Set from --log-format: the workers' log format, "json" or "console".
_log_format = "json"


def log(event: str, level: str = "info", **fields: Any) -> None:
    """Write one log line in the shape of the workers' log lines."""
    timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    if _log_format == "console":
        # The layout of structlog's console renderer, without its colours.
        pairs = "".join(f" {name}={value}" for name, value in sorted(fields.items()))
        text = f"{timestamp} [{level:<9}] {event:<30}{pairs}".rstrip()
    else:
        line = {**fields, "event": event, "level": level, "timestamp": timestamp}
        text = json.dumps(line)
    print(text, file=sys.stderr, flush=True)


# Signals the parent blocks before it turns into the supervisor.
FORWARDED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def supervise(workers: list[int]) -> int:
    """Wait for the workers; stop them all when asked to or when one exits.

    Return the exit status for this process: 0 after a requested stop.
    """
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            _signal(pid, signal.SIGTERM)

    def reload(signum: int, _frame: FrameType | None) -> None:
        for pid in workers:
            _signal(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Workers serving TLS load their certificate again; the others ignore it.
    signal.signal(signal.SIGHUP, reload)
    # The parent blocked these signals before exec, so none was lost meanwhile;
    # one that arrived is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    remaining = set(workers)
    status = 0
    while remaining:
        pid, code = os.wait()
        remaining.discard(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        # uvicorn ends with the signal it was stopped by, after a clean shutdown.
        if not (stopping and exit_code in (0, -signal.SIGTERM, -signal.SIGINT)):
            status = status or exit_code
            log("worker exited", "error", pid=pid, status=exit_code)
        # NOTE: a worker that exits is not restarted; the others are stopped
        # so that a supervisor (systemd, Kubernetes) sees the failure.
        stopping = True
        for other in remaining:
            _signal(other, signal.SIGTERM)
    log("stopped")
    return 1 if status else 0


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def serve_passwords(descriptors: list[int], slots: int) -> None:
    """Serve the workers' password requests on inherited sockets, in threads."""
    semaphore = threading.BoundedSemaphore(slots)
    for descriptor in descriptors:
        threading.Thread(
            target=password_service.serve, args=(descriptor, semaphore), daemon=True
        ).start()


def main(arguments: list[str]) -> int:
    options = dict(a[2:].split("=", 1) for a in arguments if a.startswith("--"))
    pids = [int(a) for a in arguments if not a.startswith("--")]
    global _log_format
    _log_format = options.get("log-format", "json")
    if options.get("password-sockets"):
        descriptors = [int(fd) for fd in options["password-sockets"].split(",")]
        serve_passwords(descriptors, int(options["password-slots"]))
    return supervise(pids)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
