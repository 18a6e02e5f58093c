"""Environments for the real container clients (skopeo, podman) in tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def client_environment(home: Path) -> dict[str, str]:
    """Return an environment whose temporary files and auth file lie under `home`."""
    (home / "tmp").mkdir(parents=True)
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("REGISTRY_AUTH_FILE", "CONTAINERS_", "MOORAGE_"))
    }
    environment.update(
        HOME=str(home),
        TMPDIR=str(home / "tmp"),
        REGISTRY_AUTH_FILE=str(home / "auth.json"),
        XDG_RUNTIME_DIR=str(home / "run"),
        XDG_CONFIG_HOME=str(home / "config"),
    )
    return environment


def run_client(
    *command: str | Path, env: dict[str, str] | None = None, timeout: float = 300
) -> str:
    """Run a client and return its stdout; fail with its output unless it exits 0."""
    result = subprocess.run(
        [str(part) for part in command],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited with {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return result.stdout
