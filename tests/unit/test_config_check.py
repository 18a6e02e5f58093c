"""`moorage config check`: the values it prints and how it reports invalid ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moorage.config import hide_url_password


def config_check(
    tmp_path: Path, environment: dict[str, str], *arguments: str
) -> subprocess.CompletedProcess[str]:
    """Run `moorage config check` in its own interpreter, from `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-m", "moorage", "config", "check", *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+asyncpg://u:DBPASSWORD123@127.0.0.1:1/x",
            "postgresql+asyncpg://u:***@127.0.0.1:1/x",
        ),
        ("https://hook:s3cret@example.test/in", "https://hook:***@example.test/in"),
        ("https://example.test/in", "https://example.test/in"),
        (
            "postgresql+asyncpg://moorage@db/moorage",
            "postgresql+asyncpg://moorage@db/moorage",
        ),
        (
            "sqlite+aiosqlite:////srv/data/moorage.db",
            "sqlite+aiosqlite:////srv/data/moorage.db",
        ),
    ],
)
def test_hide_url_password(url: str, expected: str) -> None:
    """The password part of a URL becomes `***`; the rest stays."""
    assert hide_url_password(url) == expected


def test_check_hides_url_passwords(tmp_path: Path) -> None:
    """Passwords in the database and webhook URLs are not printed."""
    completed = config_check(
        tmp_path,
        {
            "MOORAGE_DATABASE_URL": "postgresql+asyncpg://u:DBPASSWORD123@127.0.0.1:1/x",
            "MOORAGE_AUDIT_WEBHOOK_URL": "https://hook:HOOKPASSWORD@example.test/in",
        },
    )
    assert completed.returncode == 0, completed.stderr
    assert "DBPASSWORD123" not in completed.stdout
    assert "HOOKPASSWORD" not in completed.stdout
    assert "database_url = postgresql+asyncpg://u:***@127.0.0.1:1/x" in completed.stdout


def test_check_prints_plain_values(tmp_path: Path) -> None:
    """Secrets show as stars and paths as text, not as Python reprs."""
    completed = config_check(
        tmp_path, {"MOORAGE_METRICS_TOKEN": "METRICSTOKEN", "MOORAGE_DATA_DIR": "data"}
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "metrics_token = **********" in lines
    assert "data_dir = data" in lines
    assert "METRICSTOKEN" not in completed.stdout
    assert "SecretStr" not in completed.stdout
    assert "PosixPath" not in completed.stdout
