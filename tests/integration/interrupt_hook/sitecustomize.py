"""Loaded at start-up by the server processes of test_interrupted_migration
and of test_cli_errors' interrupted forks.

With MOORAGE_TEST_SIGNAL_AFTER_DDL=N:SIGNAL, the process that has run N
CREATE, DROP or ALTER TABLE statements sends SIGNAL to its whole process
group, as Ctrl-C in a terminal does, so the test interrupts a migration at
a known statement instead of at a guessed moment.
"""

import os
import signal

_setting = os.environ.get("MOORAGE_TEST_SIGNAL_AFTER_DDL")
if _setting:
    from typing import Any

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    _count, _, _name = _setting.partition(":")
    _left = [int(_count)]

    @event.listens_for(Engine, "after_cursor_execute")
    def _signal_after_ddl(*arguments: Any) -> None:
        statement = " ".join(str(arguments[2]).split()[:2]).upper()
        if statement in {"CREATE TABLE", "DROP TABLE", "ALTER TABLE"}:
            _left[0] -= 1
            if _left[0] == 0:
                os.killpg(os.getpgid(0), getattr(signal, _name))


# With MOORAGE_TEST_SIGNAL_AT_FORK=N:SIGNAL, the process sends SIGNAL to
# itself just before its Nth fork, from an os.register_at_fork callback: the
# moment at which a Ctrl-C used to be lost.
_fork_setting = os.environ.get("MOORAGE_TEST_SIGNAL_AT_FORK")
if _fork_setting:
    _fork_count, _, _fork_signal = _fork_setting.partition(":")
    _forks_left = [int(_fork_count)]

    def _signal_before_fork() -> None:
        _forks_left[0] -= 1
        if _forks_left[0] == 0:
            os.kill(os.getpid(), getattr(signal, _fork_signal))

    os.register_at_fork(before=_signal_before_fork)
