"""Revoking client certificates: `moorage tls revoke-client` and tls_client_crl."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from moorage import tls
from moorage.db.audit_store import AuditFilter
from tests.support.audit import wait_for_events
from tests.support.receivers import wait_until
from tests.support.server import ServerProcess
from tests.support.tls import issue_client_cert, tls_init, tls_server

STRICT = "strict"


@pytest.fixture(scope="module")
def crl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A registry with client certificates, a revocation list that starts empty,
    and one customer that must present its certificate."""
    root = tmp_path_factory.mktemp("crl")
    (root / "client.crl").touch()
    with tls_server(
        root,
        MOORAGE_TLS_CLIENT_CA=str(root / "tls" / "ca.crt"),
        MOORAGE_TLS_CLIENT_CRL=str(root / "client.crl"),
        MOORAGE_TLS_CLIENT_CERT_CUSTOMERS=f'["{STRICT}"]',
    ) as process:
        process.add_customer(STRICT)
        yield process


def _crl(server: ServerProcess) -> Path:
    assert server.ca_file is not None
    return server.ca_file.parent.parent / "client.crl"


def _client(server: ServerProcess, cert: tuple[Path, Path] | None) -> httpx.Client:
    assert server.ca_file is not None
    context = ssl.create_default_context(cafile=server.ca_file)
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.Client(base_url=server.url, verify=context)


def _revoke_command(
    ca_dir: Path, crl: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "moorage",
            "tls",
            "revoke-client",
            *args,
            "--ca-dir",
            str(ca_dir),
            "--crl",
            str(crl),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def revoke(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    assert server.ca_file is not None
    return _revoke_command(
        server.ca_file.parent, _crl(server), *args, env=server.environment()
    )


def _token(client: httpx.Client) -> httpx.Response:
    return client.get("/token", params={"service": "moorage"})


def _password_grant(client: httpx.Client, login: str, password: str) -> httpx.Response:
    return client.post(
        "/token",
        data={
            "grant_type": "password",
            "username": login,
            "password": password,
            "service": "moorage",
            "client_id": "test",
        },
    )


def test_revoked_certificate_stops_logging_in(
    crl_server: ServerProcess, tmp_path: Path
) -> None:
    """After `tls revoke-client`, the certificate's requests fail on an open
    connection, including with the right password, while another certificate
    still works. The failure is audited and raises the revoked-credential alert."""
    login, password = crl_server.add_user(STRICT, "reader")
    other, _ = crl_server.add_user(STRICT, "reader")
    cert = issue_client_cert(crl_server, login, tmp_path / "revoked")
    valid = issue_client_cert(crl_server, other, tmp_path / "valid")
    with _client(crl_server, cert) as client:
        token = _token(client)
        assert token.status_code == 200, token.text
        bearer = {"Authorization": f"Bearer {token.json()['token']}"}
        assert client.get("/v2/", headers=bearer).status_code == 200

        result = revoke(crl_server, str(cert[0]))
        assert result.returncode == 0, result.stderr
        serial = x509.load_pem_x509_certificate(cert[0].read_bytes()).serial_number
        assert f"{serial:X}" in result.stdout

        # The server reads the list again within tls_reload_seconds (0.5 s here),
        # and checks each request of this still open connection.
        assert wait_until(lambda: client.get("/v2/", headers=bearer).status_code == 401)
        assert _token(client).status_code == 401
        assert client.get("/v2/", auth=(login, password)).status_code == 401
        assert _password_grant(client, login, password).status_code == 401
    with _client(crl_server, valid) as client:
        assert _token(client).status_code == 200

    failures = wait_for_events(
        crl_server,
        AuditFilter(account=login, action="auth.login", outcome="failure"),
        lambda found: any("revoked" in (e.event.reason or "") for e in found),
    )
    assert any(f"{serial:x} revoked" in (e.event.reason or "") for e in failures)
    alerts = wait_for_events(
        crl_server,
        AuditFilter(account=login, action="alert.unusable_credential"),
        bool,
    )
    assert alerts, "no alert for the revoked certificate"


def test_password_grant_needs_the_certificate(
    crl_server: ServerProcess, tmp_path: Path
) -> None:
    """POST /token with a password gives a customer that requires mutual TLS no
    token without its certificate, as GET /token does."""
    login, password = crl_server.add_user(STRICT, "reader")
    with _client(crl_server, None) as client:
        assert _password_grant(client, login, password).status_code == 401
    cert = issue_client_cert(crl_server, login, tmp_path)
    with _client(crl_server, cert) as client:
        response = _password_grant(client, login, password)
        assert response.status_code == 200, response.text


def test_revoke_by_serial_keeps_earlier_entries(
    crl_server: ServerProcess, tmp_path: Path
) -> None:
    """--serial adds to the list; serials already listed stay listed."""
    assert revoke(crl_server, "--serial", "0A:0B").returncode == 0
    assert revoke(crl_server, "--serial", "c0ffee").returncode == 0
    assert crl_server.ca_file is not None
    revoked = tls.read_revocations(_crl(crl_server), crl_server.ca_file)
    assert {0x0A0B, 0xC0FFEE} <= {serial for _, serial in revoked}


def test_revoke_bad_input(crl_server: ServerProcess, tmp_path: Path) -> None:
    """A serial that is not hex is a usage error, and a list signed by another CA
    is rejected, each with one line naming the problem."""
    result = revoke(crl_server, "--serial", "xyz")
    assert result.returncode == 2
    assert "not a hexadecimal serial number" in result.stderr
    assert revoke(crl_server).returncode == 2

    other_ca = tls_init(tmp_path / "other")
    foreign = tmp_path / "foreign.crl"
    tls.revoke_client_certificates(other_ca, foreign, [1])
    assert crl_server.ca_file is not None
    result = _revoke_command(crl_server.ca_file.parent, foreign, "--serial", "2")
    assert result.returncode == 1
    assert "revocation list of another CA" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_foreign_crl_rejected(tmp_path: Path) -> None:
    """A list not signed by the client CA does not load at start, and a reload
    that finds one keeps the previous list."""
    ours = tls_init(tmp_path / "ours")
    theirs = tls_init(tmp_path / "theirs")
    crl = tmp_path / "client.crl"
    tls.revoke_client_certificates(ours, crl, [7])
    revocations = tls.ClientRevocations(crl, ours / "ca.crt")
    assert len(revocations) == 1

    foreign = tmp_path / "foreign.crl"
    tls.revoke_client_certificates(theirs, foreign, [8])
    with pytest.raises(tls.TlsSetupError, match="not signed by a CA"):
        tls.read_revocations(foreign, ours / "ca.crt")
    foreign.replace(crl)
    assert revocations.reload() is False
    assert len(revocations) == 1

    crl.write_text("not a list\n")
    with pytest.raises(tls.TlsSetupError, match="contains no PEM CRL"):
        tls.read_revocations(crl, ours / "ca.crt")


def test_revoke_keeps_damaged_list(tmp_path: Path) -> None:
    """revoke-client rejects a list cut short instead of replacing it with a new
    list that no longer revokes the serials the old one listed."""
    ca_dir = tls_init(tmp_path / "ca")
    crl = tmp_path / "client.crl"
    tls.revoke_client_certificates(ca_dir, crl, [7])
    damaged = crl.read_bytes()[:200]
    crl.write_bytes(damaged)

    result = _revoke_command(ca_dir, crl, "--serial", "8")

    assert result.returncode == 1
    assert "contains no PEM CRL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert crl.read_bytes() == damaged
    assert not crl.with_name("client.crl.partial").exists()


def test_list_with_unterminated_block(tmp_path: Path) -> None:
    """A file whose last list was cut short is rejected by the server and by
    revoke-client, although its first list is complete."""
    ca_dir = tls_init(tmp_path / "ca")
    first = tmp_path / "first.crl"
    second = tmp_path / "second.crl"
    tls.revoke_client_certificates(ca_dir, first, [7])
    tls.revoke_client_certificates(ca_dir, second, [8])
    crl = tmp_path / "client.crl"
    crl.write_bytes(first.read_bytes() + second.read_bytes()[:200])

    with pytest.raises(tls.TlsSetupError, match="no -----END X509 CRL----- line"):
        tls.read_revocations(crl, ca_dir / "ca.crt")
    with pytest.raises(tls.TlsSetupError, match="no -----END X509 CRL----- line"):
        tls.revoke_client_certificates(ca_dir, crl, [9])


def test_revoke_sets_list_mode(tmp_path: Path) -> None:
    """A new list is readable by the server's user whatever the umask; a
    replaced list keeps its mode."""
    ca_dir = tls_init(tmp_path / "ca")
    crl = tmp_path / "client.crl"
    previous = os.umask(0o077)
    try:
        tls.revoke_client_certificates(ca_dir, crl, [7])
        assert stat.S_IMODE(crl.stat().st_mode) == 0o644
        crl.chmod(0o640)
        tls.revoke_client_certificates(ca_dir, crl, [8])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(crl.stat().st_mode) == 0o640
    revoked = tls.read_revocations(crl, ca_dir / "ca.crt")
    assert {serial for _, serial in revoked} == {7, 8}


def test_revoke_unwritable_list(tmp_path: Path) -> None:
    """A --crl in a directory that does not exist is one line and exit 1."""
    ca_dir = tls_init(tmp_path / "ca")
    result = _revoke_command(
        ca_dir, tmp_path / "missing" / "client.crl", "--serial", "8"
    )
    assert result.returncode == 1
    assert "cannot write revocation list" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# Runs `moorage tls revoke-client` with the arguments after the first, once the
# wall clock reaches the first (a Unix time), so that two processes whose
# imports took different times revoke at the same moment.
REVOKE_AT = """
import sys, time
from moorage.cli.main import main
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
sys.argv = ["moorage", *sys.argv[2:]]
main()
"""


def test_concurrent_revokes_keep_every_serial(tmp_path: Path) -> None:
    """Two revoke-client runs started at the same moment both keep their
    serial: the second reads the list that the first wrote."""
    ca_dir = tls_init(tmp_path / "ca")
    crl = tmp_path / "client.crl"
    rounds = 5
    for round_number in range(rounds):
        start = time.time() + 3
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    REVOKE_AT,
                    str(start),
                    "tls",
                    "revoke-client",
                    "--serial",
                    f"{2 * round_number + offset + 1:X}",
                    "--ca-dir",
                    str(ca_dir),
                    "--crl",
                    str(crl),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for offset in (0, 1)
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr

    listed = {serial for _, serial in tls.read_revocations(crl, ca_dir / "ca.crt")}
    assert listed == set(range(1, 2 * rounds + 1))
    assert not crl.with_name("client.crl.partial").exists()
