"""Run `moorage` commands in the test process, on a given data directory and
database, through Typer's test runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moorage.cli import main
from moorage.cli.main import app


def _keep_logging(level: str = "info", log_format: str = "auto") -> None:
    """Leave the test process's logging as it is."""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Cli:
    def __init__(self, data_dir: Path, database_url: str) -> None:
        self.env = {
            "MOORAGE_DATA_DIR": str(data_dir),
            "MOORAGE_DATABASE_URL": database_url,
        }

    def run(self, *args: str) -> Result:
        runner = CliRunner()
        with pytest.MonkeyPatch.context() as patch:
            for key in [key for key in os.environ if key.startswith("MOORAGE_")]:
                patch.delenv(key)
            for key, value in self.env.items():
                patch.setenv(key, value)
            # Logging set up here would write to the runner's stream, which is
            # closed afterwards, and later tests in this process would fail.
            patch.setattr(main, "configure_logging", _keep_logging)
            outcome = runner.invoke(app, list(args), terminal_width=200)
        return Result(outcome.exit_code, outcome.stdout, outcome.stderr)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout
