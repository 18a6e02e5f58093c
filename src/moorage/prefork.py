"""Run `moorage serve`'s server, or fork its workers, without the CLI.

Forked workers keep every module their parent imported, and a server that
stays in the command line's process keeps its modules too. So `moorage serve`
replaces itself (exec) with `python -m moorage.prefork --settings-fd=FD`,
which imports only what a server needs and then runs
`moorage.workers.run_workers`, or `run_single` with one worker. The command
line's own modules (typer, rich and the CLI commands) stay out of the server,
and rich stays out of structlog too when the log is JSON lines. The settings
arrive pickled in an inherited anonymous file (memfd), so that secrets read
from the configuration file stay out of the command line and the environment
of the processes.

This module imports only the standard library and `moorage.config` before it
has decided about rich, because structlog imports rich when it is first
imported. `prepare` installs `moorage.lean_imports` before the server's modules
are imported, which keeps SQLAlchemy's ORM and uvicorn's command line out of
the server's processes.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import TYPE_CHECKING, NoReturn

from moorage.lean_imports import use_lean_imports

if TYPE_CHECKING:
    from moorage.config import Settings


def exec_prefork(settings: Settings) -> NoReturn:
    """Replace this process with `moorage.prefork`, which serves `settings`."""
    # An anonymous file in memory, not a pipe: no process reads it before the
    # exec, and a pipe's buffer (64 KiB) would limit the settings' size.
    read = os.memfd_create("moorage-settings")
    with open(read, "wb", closefd=False) as file:
        pickle.dump(settings, file)
    os.lseek(read, 0, os.SEEK_SET)
    os.set_inheritable(read, True)

    # A local import: in the new process, structlog must wait for `prepare`.
    from moorage.logs import flush_logs

    flush_logs()
    sys.stdout.flush()
    sys.stderr.flush()
    # -P keeps the working directory off sys.path, so that a file there named
    # like a module the server imports cannot run in it.
    os.execv(  # noqa: S606 (runs this interpreter with fixed arguments)
        sys.executable,
        [sys.executable, "-P", "-m", "moorage.prefork", f"--settings-fd={read}"],
    )


def read_settings(descriptor: int) -> Settings:
    """Read the settings that `exec_prefork` wrote to the file `descriptor`."""
    with os.fdopen(descriptor, "rb") as file:
        # Only this process, before its exec, wrote to the file.
        settings: Settings = pickle.load(file)  # noqa: S301
    return settings


def prepare(settings: Settings) -> None:
    """Configure logging and memory arenas the way `moorage serve` did before
    the exec, leaving rich out when the log is JSON lines, and SQLAlchemy's ORM
    and uvicorn's command line out in any case (see moorage.lean_imports)."""
    use_lean_imports()
    if logs_json(settings.log_format):
        # structlog imports rich, when it is installed, only to print
        # tracebacks in its console renderer. A None entry makes that import
        # fail, so structlog does without it, and each worker uses 3 MiB
        # less (tracemalloc, rich 15 with pygments).
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

    from moorage.logs import configure_logging
    from moorage.server import limit_malloc_arenas

    configure_logging(settings.log_level, settings.log_format)
    limit_malloc_arenas()


def logs_json(log_format: str) -> bool:
    """Return whether `moorage.logs.configure_logging` writes JSON lines."""
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def main(arguments: list[str]) -> int:
    options = dict(a[2:].split("=", 1) for a in arguments if a.startswith("--"))
    settings = read_settings(int(options["settings-fd"]))
    prepare(settings)

    from moorage.errors import MoorageError
    from moorage.workers import run_single, run_workers

    try:
        if settings.workers > 1:
            run_workers(settings)
        else:
            run_single(settings)
    except MoorageError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    return 0


# The exit status of a command that Ctrl-C (SIGINT) stopped, as shells report it.
INTERRUPTED = 130


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except KeyboardInterrupt:
        # Ctrl-C before uvicorn handles the signal (while the server starts):
        # stop without a traceback.
        print("interrupted while starting", file=sys.stderr)
        status = INTERRUPTED
    raise SystemExit(status)
