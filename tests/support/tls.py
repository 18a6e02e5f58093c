"""Start a registry that serves HTTPS with a private CA from `moorage tls init`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.database import create_database, drop_database
from tests.support.server import ServerProcess
from tests.support.terminal import Terminal


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
def tls_server(
    root: Path, terminal: Terminal | None = None, **env: str
) -> Iterator[ServerProcess]:
    """A fresh registry serving HTTPS with a certificate from `moorage tls init`.

    `tls init` writes into `root / "tls"`; env values may name files there.
    With `terminal`, the server runs with it as its controlling terminal.
    """
    certs = tls_init(root / "tls")
    data_dir = root / "data"
    data_dir.mkdir()
    process = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        ca_file=certs / "ca.crt",
        terminal=terminal,
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


def encrypt_key(key_file: Path, out: Path) -> Path:
    """Write `key_file` to `out` encrypted with AES-256 and a passphrase, as
    `openssl pkey -aes256` does for an administrator; return `out`."""
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(key_file),
            "-aes256",
            "-passout",
            "pass:test-passphrase",
            "-out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    assert b"ENCRYPTED" in out.read_bytes()
    return out


def issue_server_cert(ca_dir: Path, out: Path) -> tuple[Path, Path]:
    """Sign a certificate for 127.0.0.1 and a new key with the CA in `ca_dir`,
    like a renewal from the same CA. Return the certificate and key paths."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewed")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "server.crt", out / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
