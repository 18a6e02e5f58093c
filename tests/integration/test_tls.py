"""HTTPS: `moorage tls init`, protocol and cipher policy, HSTS, reloads, clients."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.support.images import OciLayout, busybox_image
from tests.support.receivers import wait_until
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique
from tests.support.terminal import terminal
from tests.support.tls import (
    client_cert_dir,
    encrypt_key,
    issue_client_cert,
    issue_server_cert,
    tls_init,
    tls_server,
)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One registry serving HTTPS for the module."""
    with tls_server(tmp_path_factory.mktemp("tls")) as process:
        yield process


def s_client(server: ServerProcess, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", server.address, *options],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def negotiated_cipher(result: subprocess.CompletedProcess[str]) -> str:
    for line in result.stdout.splitlines():
        if ", Cipher is " in line:
            return line.rsplit(" ", 1)[-1]
    return "(NONE)"


def served_certificate(server: ServerProcess) -> x509.Certificate:
    pem = ssl.get_server_certificate(("127.0.0.1", server.port))
    return x509.load_pem_x509_certificate(pem.encode())


def verified_certificate(server: ServerProcess) -> x509.Certificate:
    """Complete a handshake verified against the test CA; return the certificate
    the server presented."""
    assert server.ca_file is not None
    context = ssl.create_default_context(cafile=server.ca_file)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serials_served(server: ServerProcess, connections: int = 10) -> set[int]:
    """Return the serial numbers presented over several new connections, which
    land on any of the server's workers."""
    return {verified_certificate(server).serial_number for _ in range(connections)}


def serial_number(cert_file: Path) -> int:
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number


def wait_for_workers(server: ServerProcess, workers: int) -> None:
    """Wait until every worker has logged its start, which comes after it read the
    certificate files. A worker still starting would read files a test replaces."""
    assert wait_until(lambda: server.log().count('"event": "starting"') >= workers), (
        server.log()
    )


def replace_file(source: Path, target: Path) -> None:
    """Replace `target` with a copy of `source` in one rename, so that a file
    watcher never reads it half-written."""
    staging = target.with_name(target.name + ".new")
    shutil.copy(source, staging)
    os.replace(staging, target)


def test_tls_init_names_host_localhost_and_loopback(tmp_path: Path) -> None:
    """The server certificate covers the hostname, localhost and 127.0.0.1."""
    certs = tls_init(tmp_path / "tls", hostname="registry.example.com")
    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "registry.example.com",
        "localhost",
    ]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]
    assert os.stat(certs / "server.key").st_mode & 0o077 == 0
    assert os.stat(certs / "ca.key").st_mode & 0o077 == 0


def test_https_serves_with_hsts(https_server: ServerProcess) -> None:
    """Requests over HTTPS verify against the CA and carry Strict-Transport-Security."""
    response = httpx.get(f"{https_server.url}/v2/", verify=https_server.verify)
    assert response.status_code == 401
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert response.headers["WWW-Authenticate"].startswith(
        f'Bearer realm="{https_server.url}/token"'
    )


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_https_refuses_old_protocols(https_server: ServerProcess, version: str) -> None:
    """TLS 1.0 and 1.1 handshakes fail, even when the client offers them."""
    result = s_client(https_server, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert negotiated_cipher(result) == "(NONE)"
    assert result.returncode != 0


@pytest.mark.parametrize(
    "cipher", ["AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "AES256-GCM-SHA384"]
)
def test_https_refuses_weak_ciphers(https_server: ServerProcess, cipher: str) -> None:
    """TLS 1.2 without forward secrecy or without AEAD is refused."""
    result = s_client(https_server, "-tls1_2", "-cipher", f"{cipher}@SECLEVEL=0")
    assert negotiated_cipher(result) == "(NONE)"


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("-tls1_2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        ("-tls1_3", "TLS_AES_256_GCM_SHA384"),
    ],
)
def test_https_accepts_modern_protocols(
    https_server: ServerProcess, version: str, expected: str
) -> None:
    """TLS 1.2 with ECDHE and AES-GCM, and TLS 1.3, are accepted."""
    result = s_client(https_server, version, "-CAfile", str(https_server.ca_file))
    assert negotiated_cipher(result) == expected


def test_renewed_certificate_is_served_after_sighup(tmp_path: Path) -> None:
    """A certificate replaced on disk is served to new connections after SIGHUP."""
    with tls_server(tmp_path) as server:
        before = served_certificate(server).serial_number
        renewed = tls_init(tmp_path / "renewed")
        certs = tmp_path / "tls"
        shutil.copy(renewed / "server.key", certs / "server.key")
        shutil.copy(renewed / "server.crt", certs / "server.crt")
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        expected = x509.load_pem_x509_certificate(
            (renewed / "server.crt").read_bytes()
        ).serial_number
        deadline = time.monotonic() + 10
        while served_certificate(server).serial_number == before:
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            time.sleep(0.2)
        assert served_certificate(server).serial_number == expected
        assert wait_until(lambda: "tls certificate loaded" in server.log())


def test_renewed_certificate_is_picked_up_by_file_watch(tmp_path: Path) -> None:
    """Without a signal, a changed certificate file is loaded within the interval."""
    with tls_server(tmp_path) as server:
        before = served_certificate(server).serial_number
        renewed = tls_init(tmp_path / "renewed")
        certs = tmp_path / "tls"
        shutil.copy(renewed / "server.key", certs / "server.key")
        shutil.copy(renewed / "server.crt", certs / "server.crt")
        deadline = time.monotonic() + 10
        while served_certificate(server).serial_number == before:
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            time.sleep(0.2)


@pytest.mark.clients
def test_skopeo_copies_over_https_with_the_ca(
    https_server: ServerProcess, tmp_path: Path
) -> None:
    """skopeo pushes and pulls over HTTPS, verifying the CA from `tls init`."""
    layout = OciLayout(tmp_path / "image")
    busybox_image(layout, "v1")
    target = f"docker://{https_server.address}/{unique('tls')}/busybox:v1"
    cert_dir = client_cert_dir(https_server, tmp_path / "certs")
    creds = f"{ADMIN_LOGIN}:{ADMIN_PASSWORD}"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=true",
            f"--dest-cert-dir={cert_dir}",
            f"--dest-creds={creds}",
            f"oci:{layout.path}:v1",
            target,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=true",
            f"--src-cert-dir={cert_dir}",
            f"--src-creds={creds}",
            target,
            f"oci:{tmp_path / 'back'}:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (
        OciLayout(tmp_path / "back").read_index()["manifests"][0]["digest"]
        == (layout.read_index()["manifests"][0]["digest"])
    )


@pytest.mark.clients
def test_skopeo_refuses_server_without_the_ca(
    https_server: ServerProcess, tmp_path: Path
) -> None:
    """Without the private CA, skopeo refuses the certificate: verification is real."""
    result = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=true",
            f"--cert-dir={tmp_path}",
            f"--creds={ADMIN_LOGIN}:{ADMIN_PASSWORD}",
            f"docker://{https_server.address}/nothing/here:v1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "certificate" in result.stderr


@pytest.mark.clients
def test_podman_pushes_and_pulls_over_https(
    https_server: ServerProcess, tmp_path: Path
) -> None:
    """podman logs in, pushes and pulls over HTTPS with --cert-dir set to the CA."""
    layout = OciLayout(tmp_path / "image")
    busybox_image(layout, "v1")
    cert_dir = client_cert_dir(https_server, tmp_path / "certs")
    image = f"{https_server.address}/{unique('tls')}/busybox:v1"
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}

    def podman(*args: str) -> str:
        return subprocess.run(
            ["podman", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        ).stdout

    tls = ["--tls-verify=true", f"--cert-dir={cert_dir}"]
    podman("login", *tls, "-u", ADMIN_LOGIN, "-p", ADMIN_PASSWORD, https_server.address)
    local = podman("pull", "-q", f"oci:{layout.path}:v1").split()[-1]
    podman("push", *tls, local, f"docker://{image}")
    podman("rmi", "-f", local)
    pulled = podman("pull", "-q", *tls, image).split()[-1]
    assert pulled == local
    podman("rmi", "-f", pulled)


MTLS_CUSTOMER = "strict"


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A registry that takes client certificates and requires them of one customer."""
    root = tmp_path_factory.mktemp("mtls")
    with tls_server(
        root,
        MOORAGE_TLS_CLIENT_CA=str(root / "tls" / "ca.crt"),
        MOORAGE_TLS_CLIENT_CERT_CUSTOMERS=f'["{MTLS_CUSTOMER}"]',
    ) as process:
        process.add_customer(MTLS_CUSTOMER)
        yield process


def client_with_cert(
    server: ServerProcess, cert: tuple[Path, Path] | None
) -> httpx.Client:
    assert server.ca_file is not None
    context = ssl.create_default_context(cafile=server.ca_file)
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.Client(base_url=server.url, verify=context)


def test_client_certificate_logs_in(mtls_server: ServerProcess, tmp_path: Path) -> None:
    """A certificate whose CN is a login gets a token for that account at /token."""
    login, _ = mtls_server.add_user(MTLS_CUSTOMER, "writer")
    cert = issue_client_cert(mtls_server, login, tmp_path)
    with client_with_cert(mtls_server, cert) as client:
        token = client.get("/token", params={"service": "moorage"})
        assert token.status_code == 200, token.text
        response = client.get(
            "/v2/", headers={"Authorization": f"Bearer {token.json()['token']}"}
        )
        assert response.status_code == 200


def test_required_certificate_rejects_password_alone(
    mtls_server: ServerProcess, tmp_path: Path
) -> None:
    """For a customer that requires mTLS, a right password without its cert fails."""
    login, password = mtls_server.add_user(MTLS_CUSTOMER, "reader")
    other, _ = mtls_server.add_user(MTLS_CUSTOMER, "reader")
    with client_with_cert(mtls_server, None) as client:
        assert client.get("/v2/", auth=(login, password)).status_code == 401
        assert client.get("/token", auth=(login, password)).status_code == 401
    with client_with_cert(
        mtls_server, issue_client_cert(mtls_server, other, tmp_path)
    ) as c:
        assert c.get("/v2/", auth=(login, password)).status_code == 401
    with client_with_cert(
        mtls_server, issue_client_cert(mtls_server, login, tmp_path)
    ) as c:
        assert c.get("/v2/", auth=(login, password)).status_code == 200


def test_token_form_and_password_need_certificate(
    mtls_server: ServerProcess, tmp_path: Path
) -> None:
    """POST /token (password and refresh grants) and PUT /account/password also
    need the certificate, so a stolen password alone gets no token and cannot
    change the password."""
    login, password = mtls_server.add_user(MTLS_CUSTOMER, "reader")
    cert = issue_client_cert(mtls_server, login, tmp_path)
    form = {"grant_type": "password", "username": login, "password": password}
    offline = {**form, "access_type": "offline", "client_id": "test"}
    with client_with_cert(mtls_server, cert) as client:
        issued = client.post("/token", data=offline)
        assert issued.status_code == 200, issued.text
    refresh_token = issued.json()["refresh_token"]
    refresh_form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    new_password = {"password": "a-new-password-" + unique("p")}
    with client_with_cert(mtls_server, None) as client:
        assert client.post("/token", data=form).status_code == 401
        assert client.post("/token", data=refresh_form).status_code == 401
        changed = client.put(
            "/account/password", json=new_password, auth=(login, password)
        )
        assert changed.status_code == 401
    with client_with_cert(mtls_server, cert) as client:
        assert client.get("/v2/", auth=(login, password)).status_code == 200
        assert client.post("/token", data=refresh_form).status_code == 200


def test_other_customers_keep_passwords(mtls_server: ServerProcess) -> None:
    """Customers not listed still log in with a password and no certificate."""
    customer = mtls_server.add_customer()
    login, password = mtls_server.add_user(customer, "reader")
    with client_with_cert(mtls_server, None) as client:
        assert client.get("/v2/", auth=(login, password)).status_code == 200


@pytest.mark.clients
def test_skopeo_pushes_with_client_certificate(
    mtls_server: ServerProcess, tmp_path: Path
) -> None:
    """skopeo pushes with only a client certificate in its --cert-dir, no password."""
    login, _ = mtls_server.add_user(MTLS_CUSTOMER, "writer")
    cert_dir = client_cert_dir(mtls_server, tmp_path / "certs")
    issue_client_cert(mtls_server, login, cert_dir)
    layout = OciLayout(tmp_path / "image")
    busybox_image(layout, "v1")
    target = f"docker://{mtls_server.address}/{MTLS_CUSTOMER}/busybox:v1"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=true",
            f"--dest-cert-dir={cert_dir}",
            f"oci:{layout.path}:v1",
            target,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=true", f"--cert-dir={cert_dir}", target],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert '"Name"' in result.stdout


def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    """With two workers, SIGHUP to the server's process reaches both workers:
    the server keeps serving and new connections get the renewed certificate."""
    with tls_server(
        tmp_path, MOORAGE_WORKERS="2", MOORAGE_TLS_RELOAD_SECONDS="3600"
    ) as server:
        wait_for_workers(server, 2)
        renewed = tls_init(tmp_path / "renewed")
        certs = tmp_path / "tls"
        shutil.copy(renewed / "server.key", certs / "server.key")
        shutil.copy(renewed / "server.crt", certs / "server.crt")
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        expected = x509.load_pem_x509_certificate(
            (renewed / "server.crt").read_bytes()
        ).serial_number
        assert wait_until(lambda: server.log().count("tls certificate loaded") >= 2)
        # New connections land on either worker; each must serve the new one.
        serials = {served_certificate(server).serial_number for _ in range(10)}
        assert serials == {expected}
        assert server.process.poll() is None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_mismatched_reload_keeps_previous_certificate(
    tmp_path: Path, workers: str
) -> None:
    """Every worker rejects a certificate replaced without its key and goes on
    completing handshakes with the previous pair. Once the matching key is in
    place, the next SIGHUP loads the new pair."""
    with tls_server(
        tmp_path, MOORAGE_WORKERS=workers, MOORAGE_TLS_RELOAD_SECONDS="3600"
    ) as server:
        assert server.process is not None
        wait_for_workers(server, int(workers))
        certs = tmp_path / "tls"
        previous = serial_number(certs / "server.crt")
        renewed_cert, renewed_key = issue_server_cert(certs, tmp_path / "renewed")

        replace_file(renewed_cert, certs / "server.crt")
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(
            lambda: server.log().count("tls certificate reload failed") >= int(workers)
        ), server.log()
        assert serials_served(server) == {previous}
        assert "does not belong to the certificate" in server.log()
        response = httpx.get(f"{server.url}/v2/", verify=server.verify)
        assert response.status_code == 401

        replace_file(renewed_key, certs / "server.key")
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(
            lambda: server.log().count("tls certificate loaded") >= int(workers)
        ), server.log()
        assert serials_served(server) == {serial_number(renewed_cert)}
        assert server.process.poll() is None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_encrypted_key_reload_keeps_serving(tmp_path: Path, workers: str) -> None:
    """A renewal with an encrypted key is rejected without a passphrase prompt
    on the server's terminal. The previous pair keeps serving, and SIGTERM still
    stops the server."""
    with (
        terminal() as tty,
        tls_server(
            tmp_path,
            terminal=tty,
            MOORAGE_WORKERS=workers,
            MOORAGE_TLS_RELOAD_SECONDS="3600",
        ) as server,
    ):
        assert server.process is not None
        wait_for_workers(server, int(workers))
        certs = tmp_path / "tls"
        previous = serial_number(certs / "server.crt")
        renewed_cert, renewed_key = issue_server_cert(certs, tmp_path / "renewed")
        encrypted = encrypt_key(renewed_key, tmp_path / "renewed" / "encrypted.key")

        replace_file(encrypted, certs / "server.key")
        replace_file(renewed_cert, certs / "server.crt")
        server.process.send_signal(signal.SIGHUP)
        message = f"the TLS private key {certs / 'server.key'} is encrypted"
        assert wait_until(lambda: server.log().count(message) >= int(workers)), (
            f"log:\n{server.log()}\nterminal:\n{tty.output()}"
        )
        assert serials_served(server) == {previous}
        assert "pass phrase" not in tty.output()

        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=20)


def test_failed_reload_warns_once_per_change(tmp_path: Path) -> None:
    """The file watcher tries a failed pair again only after a file changes
    again, so a bad pair is not reported at every poll. SIGHUP always retries."""
    with tls_server(tmp_path, MOORAGE_TLS_RELOAD_SECONDS="0.2") as server:
        assert server.process is not None
        certs = tmp_path / "tls"
        renewed_cert, _ = issue_server_cert(certs, tmp_path / "renewed")

        replace_file(renewed_cert, certs / "server.crt")
        assert wait_until(lambda: "tls certificate reload failed" in server.log())
        time.sleep(2)  # ten more polls
        assert server.log().count("tls certificate reload failed") == 1

        server.process.send_signal(signal.SIGHUP)
        assert wait_until(
            lambda: server.log().count("tls certificate reload failed") == 2
        )
