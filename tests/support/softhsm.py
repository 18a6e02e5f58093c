"""A SoftHSM2 token of the test's own, initialised in a temporary directory."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

LIBRARY_CANDIDATES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
)


@dataclass(frozen=True)
class SoftHsm:
    config: Path
    library: Path
    token: str
    pin: str

    def environment(self) -> dict[str, str]:
        """Settings that point Moorage at this token."""
        return {
            "SOFTHSM2_CONF": str(self.config),
            "MOORAGE_ENCRYPTION_KEY_SOURCE": "pkcs11",
            "MOORAGE_PKCS11_LIBRARY": str(self.library),
            "MOORAGE_PKCS11_TOKEN": self.token,
            "MOORAGE_PKCS11_PIN": self.pin,
        }


TOKEN_LABEL = "moorage-test"


def init_token(directory: Path, token: str = TOKEN_LABEL) -> SoftHsm:
    """Create a SoftHSM2 configuration and one initialised token under `directory`."""
    library = next((path for path in LIBRARY_CANDIDATES if path.exists()), None)
    if library is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2)")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    config = directory / "softhsm2.conf"
    config.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    pin = "1234-test-pin"
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            token,
            "--pin",
            pin,
            "--so-pin",
            "5678-so-pin",
        ],
        env={"SOFTHSM2_CONF": str(config), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    return SoftHsm(config, library, token, pin)
