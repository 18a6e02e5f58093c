"""`moorage tls init`, `moorage tls client-cert` and `moorage serve` with bad TLS
input: one line on stderr and a non-zero exit, never a traceback, and nothing
overwritten or initialised."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.cli import Cli
from tests.support.database import create_database, drop_database
from tests.support.terminal import Terminal, terminal
from tests.support.tls import encrypt_key, tls_init

TLS_FILES = ["ca.crt", "ca.key", "server.crt", "server.key"]


def moorage(
    *arguments: str, env: dict[str, str] | None = None, tty: Terminal | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own interpreter, so that stdout and stderr are what
    users see. With `tty`, the command runs with that controlling terminal."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **(tty.popen_options() if tty else {}),  # type: ignore[arg-type]
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Check for exit code 1 and a single `error:` line; return that line."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def san_names(certs: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name) for name in names.get_values_for_type(x509.DNSName)]


# tls init


def test_tls_init_keeps_existing_ca(tmp_path: Path) -> None:
    """A second `tls init` into the same directory changes no file."""
    certs = tls_init(tmp_path / "tls")
    before = {name: (certs / name).read_bytes() for name in TLS_FILES}

    result = moorage("tls", "init", "--hostname", "registry.test", "--out", str(certs))

    line = assert_one_line_error(result)
    assert "--force" in line
    assert str(certs / "ca.key") in line
    assert {name: (certs / name).read_bytes() for name in TLS_FILES} == before


def test_tls_init_refuses_any_existing_file(tmp_path: Path) -> None:
    """One file left from an earlier run is enough to refuse."""
    certs = tmp_path / "tls"
    certs.mkdir()
    (certs / "server.key").write_text("kept")

    result = moorage("tls", "init", "--hostname", "registry.test", "--out", str(certs))

    assert_one_line_error(result)
    assert (certs / "server.key").read_text() == "kept"
    assert not (certs / "ca.key").exists()


def test_tls_init_force_replaces_ca(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls")
    before = (certs / "ca.key").read_bytes()

    result = moorage(
        "tls", "init", "--hostname", "registry.test", "--out", str(certs), "--force"
    )

    assert result.returncode == 0, result.stderr
    assert (certs / "ca.key").read_bytes() != before


@pytest.mark.parametrize(
    "hostname",
    [
        "",
        "a" * 300,
        "bad host/../x",
        "registry_1.test",
        "-registry.test",
        "registry..test",
        "registry.test.",
        "a" * 64 + ".test",
    ],
    ids=[
        "empty",
        "300-characters",
        "space-and-slash",
        "underscore",
        "leading-hyphen",
        "empty-label",
        "trailing-dot",
        "64-character-label",
    ],
)
def test_tls_init_rejects_invalid_hostname(tmp_path: Path, hostname: str) -> None:
    """An invalid DNS name gets one line naming it, and no file is written."""
    out = tmp_path / "tls"

    result = moorage("tls", "init", "--hostname", hostname, "--out", str(out))

    line = assert_one_line_error(result)
    assert "invalid hostname" in line or "hostname is empty" in line
    assert not out.exists()


def test_tls_init_encodes_internationalised_name(tmp_path: Path) -> None:
    """A name with non-ASCII letters goes into the certificate as its A-label."""
    out = tmp_path / "tls"

    result = moorage("tls", "init", "--hostname", "ünï.test", "--out", str(out))

    assert result.returncode == 0, result.stderr
    assert san_names(out) == ["xn--n-nga1b.test", "localhost"]
    assert "xn--n-nga1b.test" in result.stdout
    assert "/etc/docker/certs.d/xn--n-nga1b.test:5000" in result.stdout


def test_tls_init_long_name_has_no_common_name(tmp_path: Path) -> None:
    """A DNS name longer than a common name may be goes into the SAN only."""
    hostname = "a" * 60 + "." + "b" * 60 + ".test"
    out = tmp_path / "tls"

    result = moorage("tls", "init", "--hostname", hostname, "--out", str(out))

    assert result.returncode == 0, result.stderr
    assert san_names(out) == [hostname, "localhost"]
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    assert len(cert.subject) == 0
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical


def test_tls_init_prints_containerd_host_table(tmp_path: Path) -> None:
    """The hosts.toml example keeps its `[host."https://NAME:PORT"]` line."""
    result = moorage(
        "tls", "init", "--hostname", "registry.test", "--out", str(tmp_path / "tls")
    )

    assert result.returncode == 0, result.stderr
    assert '[host."https://registry.test:5000"]' in result.stdout


def test_tls_init_does_not_wrap_commands(tmp_path: Path) -> None:
    """Commands stay on one line however narrow the terminal is."""
    out = tmp_path / ("long-directory-name-" * 4) / "tls"

    result = moorage(
        "tls",
        "init",
        "--hostname",
        "registry.test",
        "--out",
        str(out),
        env={"COLUMNS": "40", "TERM": "xterm"},
    )

    assert result.returncode == 0, result.stderr
    serve = f"  moorage serve --tls-cert {out}/server.crt --tls-key {out}/server.key"
    assert serve in result.stdout.splitlines()
    copy = f"cp {out.resolve()}/ca.crt /etc/docker/certs.d/registry.test:5000/ca.crt"
    assert any(line.strip().endswith(copy) for line in result.stdout.splitlines())


def test_tls_init_brackets_ipv6_address(tmp_path: Path) -> None:
    result = moorage("tls", "init", "--hostname", "::1", "--out", str(tmp_path / "t"))

    assert result.returncode == 0, result.stderr
    assert "/etc/docker/certs.d/[::1]:5000" in result.stdout


# tls client-cert


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """An installation with customer acme, user alice and robot acme+ci."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = create_database(data_dir)
    runner = Cli(data_dir, url)
    runner.ok("customer", "add", "acme")
    runner.ok("user", "add", "acme", "alice")
    runner.ok("robot", "add", "acme", "ci")
    yield runner
    drop_database(url)


@pytest.mark.parametrize(
    "login", ["../../x", "/tmp/x", "a/b", "..", "acme+../x", "acme+", "+ci"]
)
def test_client_cert_rejects_login_with_path(
    cli: Cli, tmp_path: Path, login: str
) -> None:
    """A login that is not valid account syntax is rejected; no file is written."""
    certs = tls_init(tmp_path / "tls")
    out = tmp_path / "deep" / "er" / "out"

    result = moorage(
        "tls", "client-cert", login, "--ca-dir", str(certs), "--out", str(out),
        env=cli.env,
    )  # fmt: skip

    line = assert_one_line_error(result)
    assert "invalid" in line
    assert list(tmp_path.rglob("*.cert")) == []
    assert not out.exists()


def test_client_cert_rejects_unknown_account(cli: Cli, tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls")
    out = tmp_path / "out"

    result = cli.run(
        "tls", "client-cert", "bob", "--ca-dir", str(certs), "--out", str(out)
    )

    assert result.returncode == 1
    assert "no account has the login 'bob'" in result.stderr
    assert "--skip-account-check" in result.stderr
    assert not (out / "bob.cert").exists()


@pytest.mark.parametrize("login", ["alice", "acme+ci"])
def test_client_cert_issues_for_account(cli: Cli, tmp_path: Path, login: str) -> None:
    """Users and robots get a certificate whose common name is their login."""
    certs = tls_init(tmp_path / "tls")
    out = tmp_path / "out"

    cli.ok("tls", "client-cert", login, "--ca-dir", str(certs), "--out", str(out))

    cert = x509.load_pem_x509_certificate((out / f"{login}.cert").read_bytes())
    common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert common_name[0].value == login
    assert os.stat(out / f"{login}.key").st_mode & 0o077 == 0


def test_client_cert_skips_account_check(tmp_path: Path) -> None:
    """With --skip-account-check no installation is needed, only valid syntax."""
    certs = tls_init(tmp_path / "tls")
    out = tmp_path / "out"

    result = moorage(
        "tls", "client-cert", "carol", "--ca-dir", str(certs), "--out", str(out),
        "--skip-account-check", env={"MOORAGE_DATA_DIR": str(tmp_path / "none")},
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert (out / "carol.cert").is_file()
    assert not (tmp_path / "none").exists()


def test_client_cert_without_installation(tmp_path: Path) -> None:
    """Without a data directory, the error points at --skip-account-check."""
    certs = tls_init(tmp_path / "tls")

    result = moorage(
        "tls", "client-cert", "carol", "--ca-dir", str(certs), "--out",
        str(tmp_path / "out"), env={"MOORAGE_DATA_DIR": str(tmp_path / "none")},
    )  # fmt: skip

    assert result.returncode == 2
    assert "--skip-account-check" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "none").exists()


def test_client_cert_missing_ca(tmp_path: Path) -> None:
    result = moorage(
        "tls", "client-cert", "carol", "--ca-dir", str(tmp_path / "nothing"),
        "--out", str(tmp_path / "out"), "--skip-account-check",
    )  # fmt: skip

    line = assert_one_line_error(result)
    assert str(tmp_path / "nothing" / "ca.crt") in line


def test_client_cert_encrypted_ca_key(tmp_path: Path) -> None:
    """A CA key encrypted with a passphrase is named in one line, with no prompt."""
    certs = tls_init(tmp_path / "tls")
    encrypt_key(certs / "ca.key", tmp_path / "ca.key")
    os.replace(tmp_path / "ca.key", certs / "ca.key")
    with terminal() as tty:
        result = moorage(
            "tls", "client-cert", "carol", "--ca-dir", str(certs),
            "--out", str(tmp_path / "out"), "--skip-account-check", tty=tty,
        )  # fmt: skip
        terminal_output = tty.output()

    line = assert_one_line_error(result)
    assert f"the CA private key {certs / 'ca.key'} is encrypted" in line
    assert "pass phrase" not in terminal_output
    assert not (tmp_path / "out").exists()


# serve


def serve(
    data_dir: Path, *options: str, tty: Terminal | None = None
) -> subprocess.CompletedProcess[str]:
    """Start `moorage serve` on a new installation; it must fail before serving."""
    env = {
        "MOORAGE_DATA_DIR": str(data_dir),
        "MOORAGE_DATABASE_URL": create_database(data_dir),
        "MOORAGE_PORT": "1",
    }
    try:
        return moorage("serve", *options, env=env, tty=tty)
    finally:
        drop_database(env["MOORAGE_DATABASE_URL"])


def test_serve_missing_certificate_initialises_nothing(tmp_path: Path) -> None:
    """A certificate path that does not exist is named in one line, before the
    first start creates the data directory or prints an admin password."""
    certs = tls_init(tmp_path / "tls")
    data_dir = tmp_path / "data"
    missing = tmp_path / "nonexist.crt"

    result = serve(
        data_dir, "--tls-cert", str(missing), "--tls-key", str(certs / "server.key")
    )

    line = assert_one_line_error(result)
    assert str(missing) in line
    assert "password" not in result.stdout
    assert not data_dir.exists()


def test_serve_key_of_another_certificate(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls")
    other = tls_init(tmp_path / "other")
    data_dir = tmp_path / "data"

    result = serve(
        data_dir,
        "--tls-cert",
        str(certs / "server.crt"),
        "--tls-key",
        str(other / "server.key"),
    )

    line = assert_one_line_error(result)
    assert "does not belong to the certificate" in line
    assert str(other / "server.key") in line
    assert not data_dir.exists()


def test_serve_key_that_is_not_a_key(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls")
    data_dir = tmp_path / "data"

    result = serve(
        data_dir,
        "--tls-cert",
        str(certs / "server.crt"),
        "--tls-key",
        str(certs / "ca.crt"),
    )

    line = assert_one_line_error(result)
    assert str(certs / "ca.crt") in line
    assert not data_dir.exists()


def test_serve_encrypted_key_without_prompt(tmp_path: Path) -> None:
    """A key encrypted with a passphrase ends `moorage serve` with one line
    naming it, before anything is created. OpenSSL's passphrase prompt, which
    reads the controlling terminal, never appears there."""
    certs = tls_init(tmp_path / "tls")
    encrypted = encrypt_key(certs / "server.key", tmp_path / "encrypted.key")
    data_dir = tmp_path / "data"

    with terminal() as tty:
        result = serve(
            data_dir,
            "--tls-cert",
            str(certs / "server.crt"),
            "--tls-key",
            str(encrypted),
            tty=tty,
        )
        terminal_output = tty.output()

    line = assert_one_line_error(result)
    assert f"the TLS private key {encrypted} is encrypted with a passphrase" in line
    assert "pass phrase" not in terminal_output
    assert "password" not in result.stdout
    assert not data_dir.exists()
