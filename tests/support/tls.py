"""Start a registry that serves HTTPS with a private CA from `moorage tls init`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.database import create_database, drop_database
from tests.support.server import ServerProcess


def tls_init(out: Path, hostname: str = "registry.test") -> Path:
    """Run `moorage tls init` and return the directory it wrote."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "moorage",
            "tls",
            "init",
            "--hostname",
            hostname,
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def client_cert_dir(server: ServerProcess, out: Path) -> Path:
    """A --cert-dir for skopeo and podman holding only the CA, as docs/tls.md says.

    The directory `tls init` writes holds server.key too, which these clients would
    take for half of a client certificate pair.
    """
    assert server.ca_file is not None
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(server.ca_file, out / "ca.crt")
    return out


def issue_client_cert(
    server: ServerProcess, login: str, out: Path
) -> tuple[Path, Path]:
    """Run `moorage tls client-cert` with the server's CA and installation, which
    must have an account `login`; return the certificate and key paths."""
    assert server.ca_file is not None
    subprocess.run(
        [
            sys.executable,
            "-m",
            "moorage",
            "tls",
            "client-cert",
            login,
            "--ca-dir",
            str(server.ca_file.parent),
            "--out",
            str(out),
        ],
        env=server.environment(),
        check=True,
        capture_output=True,
    )
    return out / f"{login}.cert", out / f"{login}.key"


@contextmanager
def tls_server(root: Path, **env: str) -> Iterator[ServerProcess]:
    """A fresh registry serving HTTPS with a certificate from `moorage tls init`.

    `tls init` writes into `root / "tls"`; env values may name files there.
    """
    certs = tls_init(root / "tls")
    data_dir = root / "data"
    data_dir.mkdir()
    process = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        ca_file=certs / "ca.crt",
        extra_env={
            "MOORAGE_TLS_CERT": str(certs / "server.crt"),
            "MOORAGE_TLS_KEY": str(certs / "server.key"),
            "MOORAGE_TLS_RELOAD_SECONDS": "0.5",
            **env,
        },
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
        drop_database(process.database_url)
