"""Environments for the real container clients (skopeo, podman) in tests."""

from __future__ import annotations

import os
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
