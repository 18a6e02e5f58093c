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


def test_workers_leave_out_orm_and_uvicorn_command_line() -> None:
    """The server needs only SQLAlchemy Core and uvicorn's server: the ORM,
    uvicorn's command line, click and watchfiles stay out of the workers."""
    modules = _prefork_modules("json")
    assert "sqlalchemy.ext.asyncio.engine" in modules
    assert "uvicorn.server" in modules
    assert not {name for name in modules if name.startswith("sqlalchemy.orm")}
    assert "sqlalchemy.ext.asyncio.session" not in modules
    assert "uvicorn.main" not in modules
    assert "click" not in modules
    assert "watchfiles" not in modules


# Each package that moorage.lean_imports loads without its __init__, imported
# in full in a fresh interpreter: the names that the lean package serves from
# its modules must be the very objects that the full package offers.
FULL_PACKAGE_NAMES = """
import importlib, sys
from moorage.lean_imports import LEAN_PACKAGES
for package, provided in LEAN_PACKAGES.items():
    full = importlib.import_module(package)
    for submodule, names in provided.items():
        module = importlib.import_module(f"{package}.{submodule}")
        for name in names:
            assert getattr(full, name) is getattr(module, name), (package, name)
print("ok")
"""

# With the finder: the lean names without the ORM or uvicorn.main, then a name
# that only the full package has, after which everything is there.
LEAN_THEN_FULL = """
import sys
from moorage.lean_imports import use_lean_imports
use_lean_imports()
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.asyncio import engine
assert AsyncEngine is engine.AsyncEngine
assert uvicorn.Config.__module__ == "uvicorn.config"
assert uvicorn.Server.__module__ == "uvicorn.server"
assert uvicorn.__version__
assert "sqlalchemy.orm" not in sys.modules, "orm"
assert "uvicorn.main" not in sys.modules, "uvicorn.main"
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
assert AsyncSession.__module__ == "sqlalchemy.ext.asyncio.session"
import sqlalchemy.ext.asyncio as full
assert full.AsyncEngine is AsyncEngine
assert full.async_scoped_session
assert callable(uvicorn.run)
assert "uvicorn.main" in sys.modules
try:
    from sqlalchemy.ext.asyncio import NoSuchName
except ImportError:
    print("ok")
"""


def test_lean_package_names_match_the_full_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FULL_PACKAGE_NAMES],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "ok"


def test_lean_packages_load_in_full_on_other_names() -> None:
    """A name outside the lean set runs the package's own __init__, so any
    user of these packages in a server process finds all their names."""
    result = subprocess.run(
        [sys.executable, "-c", LEAN_THEN_FULL],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
