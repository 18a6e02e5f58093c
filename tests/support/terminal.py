"""A pseudo-terminal to start a process with, as if run from an interactive shell.

OpenSSL prompts for a passphrase on the controlling terminal (/dev/tty), not on
stdin, so a test that proves a process never prompts gives it a terminal of its
own: the process starts a new session and makes the terminal's secondary side
its stdin and controlling terminal. Whatever it writes to /dev/tty can be read
back from the primary side.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Terminal:
    primary: int
    secondary: int
    _received: bytearray = field(default_factory=bytearray)

    def popen_options(self) -> dict[str, object]:
        """Return subprocess.Popen keyword arguments that attach the terminal."""
        return {
            "stdin": self.secondary,
            "start_new_session": True,
            "preexec_fn": _take_controlling_terminal,
        }

    def output(self) -> str:
        """Return everything written to the terminal so far."""
        while select.select([self.primary], [], [], 0)[0]:
            try:
                chunk = os.read(self.primary, 4096)
            except OSError:  # EIO once no process has the terminal open
                break
            if not chunk:
                break
            self._received += chunk
        return self._received.decode(errors="replace")


def _take_controlling_terminal() -> None:
    # Runs in the child after setsid(), with the terminal already on fd 0.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@contextmanager
def terminal() -> Iterator[Terminal]:
    """Open a pseudo-terminal; close both sides on exit."""
    primary, secondary = pty.openpty()
    try:
        yield Terminal(primary, secondary)
    finally:
        os.close(secondary)
        os.close(primary)
