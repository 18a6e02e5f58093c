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
