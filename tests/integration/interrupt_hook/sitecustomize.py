"""Loaded at start-up by the server processes of test_interrupted_migration.

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
