"""The `moorage` command: the command line, stopped quietly by Ctrl-C.

Click turns Ctrl-C during a command into "Aborted!", but not while the
command line's modules load, which takes most of a second. This module
imports nothing of Moorage until it can catch that.
"""

from __future__ import annotations

import signal
import sys

# The exit status of a command that Ctrl-C (SIGINT) stopped, as shells report it.
INTERRUPTED = 130


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        # A certificate reload asked for while the server starts must not stop
        # it; `moorage serve` keeps SIGHUP ignored until its handler exists.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from moorage.cli.main import main as run

        run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
