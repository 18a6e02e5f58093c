"""The systemd unit and the configuration file in deploy/."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moorage.config import Settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "moorage.service"
CONFIG = ROOT / "deploy" / "moorage.toml"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
def test_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing wrong once ExecStart names a real
    moorage command (the unit's /opt/moorage does not exist here)."""
    moorage = Path(sys.executable).with_name("moorage")
    assert moorage.exists(), moorage
    text = UNIT.read_text().replace("/opt/moorage/bin/moorage", str(moorage))
    unit = tmp_path / "moorage.service"
    unit.write_text(text)
    completed = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.strip() == ""


def test_unit_matches_config() -> None:
    """The unit serves the sample configuration, whose directories are the
    unit's state directories."""
    service = _unit()["Service"]
    assert service["ExecStart"].split()[1:] == ["serve"]
    assert service["Environment"] == "MOORAGE_CONFIG=/etc/moorage/moorage.toml"
    states = {f"/var/lib/{name}" for name in service["StateDirectory"].split()}
    config = tomllib.loads(CONFIG.read_text())
    assert {config["data_dir"], config["encryption_key_dir"]} == states


def test_config_checks(tmp_path: Path) -> None:
    """`moorage config check` accepts the sample configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env["MOORAGE_CONFIG"] = str(CONFIG)
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", "config", "check"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert "workers = 2" in completed.stdout


def test_stop_timeout_covers_shutdown() -> None:
    """TimeoutStopSec leaves time for requests to finish and for the audit
    writer's retries, so systemd does not kill a server that is stopping."""
    fields = Settings.model_fields
    graceful = fields["graceful_shutdown_seconds"].default
    audit = fields["audit_shutdown_seconds"].default
    timeout = float(_unit()["Service"]["TimeoutStopSec"])
    assert graceful + audit < timeout
