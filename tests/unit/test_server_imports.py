"""What a server process imports before its first request."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter, because this test process imports everything.
SERVER_IMPORTS = """
import sys
import moorage.cli.main, moorage.server, moorage.workers
from moorage.api import admin
admin.routes(object())
print(",".join(sorted(sys.modules)))
"""


def test_admin_api_not_imported() -> None:
    """Serving registry requests loads neither FastAPI nor matplotlib."""
    result = subprocess.run(
        [sys.executable, "-c", SERVER_IMPORTS],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(result.stdout.strip().split(","))
    assert "moorage.server" in modules
    assert "fastapi" not in modules
    assert "moorage.api.admin.app" not in modules
    assert "matplotlib" not in modules


# What `python -m moorage.prefork` has imported when it forks the workers.
PREFORK_IMPORTS = """
import sys
from moorage import prefork
from moorage.config import Settings
prefork.prepare(Settings(log_format=sys.argv[1]))
import moorage.workers
print(",".join(name for name, module in sys.modules.items() if module is not None))
"""


def _prefork_modules(log_format: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", PREFORK_IMPORTS, log_format],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(result.stdout.strip().split(","))


def test_workers_leave_out_cli_and_rich() -> None:
    """The process that forks the workers loads no CLI module, no rich when the
    log is JSON lines, and no PostgreSQL dialect for a SQLite database."""
    modules = _prefork_modules("json")
    assert "moorage.workers" in modules
    assert "structlog" in modules
    assert "typer" not in modules
    assert "moorage.cli.main" not in modules
    assert "rich" not in modules
    assert "pygments" not in modules
    assert "sqlalchemy.dialects.postgresql" not in modules


def test_workers_keep_rich_for_console_logs() -> None:
    """With console logs, structlog keeps rich for its tracebacks."""
    modules = _prefork_modules("console")
    assert "rich" in modules
