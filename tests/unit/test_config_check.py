"""`moorage config check`: the values it prints and how it reports invalid ones."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moorage.config import hide_url_secrets


def config_check(
    tmp_path: Path, environment: dict[str, str], *arguments: str
) -> subprocess.CompletedProcess[str]:
    """Run `moorage config check` in its own interpreter, from `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-m", "moorage", "config", "check", *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+asyncpg://u:DBPASSWORD123@127.0.0.1:1/x",
            "postgresql+asyncpg://u:***@127.0.0.1:1/x",
        ),
        ("https://hook:s3cret@example.test/in", "https://hook:***@example.test/in"),
        ("https://example.test/in", "https://example.test/in"),
        (
            "postgresql+asyncpg://moorage@db/moorage",
            "postgresql+asyncpg://moorage@db/moorage",
        ),
        (
            "sqlite+aiosqlite:////srv/data/moorage.db",
            "sqlite+aiosqlite:////srv/data/moorage.db",
        ),
        (
            "postgresql+asyncpg://u@db/x?password=QUERYPW&ssl=require",
            "postgresql+asyncpg://u@db/x?password=***&ssl=require",
        ),
        (
            "postgresql://u@db/x?sslpassword=KEYPW&application_name=moorage",
            "postgresql://u@db/x?sslpassword=***&application_name=moorage",
        ),
        (
            "https://siem.example.test/in?token=HOOKTOKEN&source=moorage",
            "https://siem.example.test/in?token=***&source=***",
        ),
        ("https://siem.example.test/in?HOOKTOKEN", "https://siem.example.test/in?***"),
        ("https://siem.example.test/in#HOOKTOKEN", "https://siem.example.test/in#***"),
        (
            "https://hooks.example.test/services/T0001/B0002/Xk29sLq81mZp04Tb7QwErT5y",
            "https://hooks.example.test/services/T0001/B0002/***",
        ),
    ],
)
def test_hide_url_secrets(url: str, expected: str) -> None:
    """Passwords, query values that can be secrets and token-like path segments
    of a URL become `***`; the rest stays."""
    assert hide_url_secrets(url) == expected


def test_check_hides_url_passwords(tmp_path: Path) -> None:
    """Passwords in the database and webhook URLs are not printed."""
    completed = config_check(
        tmp_path,
        {
            "MOORAGE_DATABASE_URL": "postgresql+asyncpg://u:DBPASSWORD123@127.0.0.1:1/x",
            "MOORAGE_AUDIT_WEBHOOK_URL": "https://hook:HOOKPASSWORD@example.test/in",
        },
    )
    assert completed.returncode == 0, completed.stderr
    assert "DBPASSWORD123" not in completed.stdout
    assert "HOOKPASSWORD" not in completed.stdout
    assert "database_url = postgresql+asyncpg://u:***@127.0.0.1:1/x" in completed.stdout


def test_check_hides_url_query_secrets(tmp_path: Path) -> None:
    """A password in the database URL's query and tokens in the webhook URLs
    (query and path) are not printed."""
    completed = config_check(
        tmp_path,
        {
            "MOORAGE_DATABASE_URL": "postgresql+asyncpg://u@127.0.0.1:1/x?password=DBQUERYPW",
            "MOORAGE_AUDIT_WEBHOOK_URL": "https://example.test/in?access_token=AUDITTOKEN",
            "MOORAGE_ALERT_WEBHOOK_URL": (
                "https://example.test/hooks/123/AlertToken0123456789abcdef"
            ),
        },
    )
    assert completed.returncode == 0, completed.stderr
    assert "DBQUERYPW" not in completed.stdout
    assert "AUDITTOKEN" not in completed.stdout
    assert "AlertToken0123456789abcdef" not in completed.stdout
    assert "database_url = postgresql+asyncpg://u@127.0.0.1:1/x?password=***" in (
        completed.stdout
    )
    assert "audit_webhook_url = https://example.test/in?access_token=***" in (
        completed.stdout
    )


def test_check_prints_plain_values(tmp_path: Path) -> None:
    """Secrets show as stars and paths as text, not as Python reprs."""
    completed = config_check(
        tmp_path, {"MOORAGE_METRICS_TOKEN": "METRICSTOKEN", "MOORAGE_DATA_DIR": "data"}
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "metrics_token = **********" in lines
    assert "data_dir = data" in lines
    assert "METRICSTOKEN" not in completed.stdout
    assert "SecretStr" not in completed.stdout
    assert "PosixPath" not in completed.stdout


def error_lines(completed: subprocess.CompletedProcess[str]) -> list[str]:
    """Return stderr's lines, after checking that the command failed cleanly."""
    assert completed.returncode == 2, completed.stdout
    assert "Traceback" not in completed.stderr
    assert "\\x0a" not in completed.stderr
    assert "errors.pydantic.dev" not in completed.stderr
    return completed.stderr.splitlines()


def test_invalid_port_one_line(tmp_path: Path) -> None:
    """A value of the wrong type names the setting, the value and the variable."""
    lines = error_lines(config_check(tmp_path, {"MOORAGE_PORT": "abc"}))
    assert len(lines) == 1, lines
    assert lines[0].startswith("invalid configuration: port = 'abc'")
    assert "environment variable MOORAGE_PORT" in lines[0]
    assert "valid integer" in lines[0]


def test_invalid_json_list_one_line(tmp_path: Path) -> None:
    """A list setting that is not valid JSON is one line, not a traceback."""
    environment = {"MOORAGE_ENCRYPTION_PREVIOUS_KEYS": '["x", 5'}
    lines = error_lines(config_check(tmp_path, environment))
    assert len(lines) == 1, lines
    assert "encryption_previous_keys" in lines[0]
    assert "MOORAGE_ENCRYPTION_PREVIOUS_KEYS" in lines[0]
    assert "not valid JSON" in lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("MOORAGE_ENCRYPTION_KEY", "notbase64SECRET!!", "not valid base64"),
        ("MOORAGE_ENCRYPTION_KEY", base64.b64encode(b"SECRET16").decode(), "8 bytes"),
        (
            "MOORAGE_ENCRYPTION_PREVIOUS_KEYS",
            '["notbase64SECRET!!"]',
            "key 1: not valid base64",
        ),
    ],
)
def test_invalid_key_rejected(
    tmp_path: Path, variable: str, value: str, problem: str
) -> None:
    """A key-encryption key that is not base64 of 32 bytes is rejected without
    showing the key."""
    good_key = base64.b64encode(bytes(32)).decode()
    environment = {
        "MOORAGE_ENCRYPTION_KEY_SOURCE": "env",
        "MOORAGE_ENCRYPTION_KEY": good_key,
        variable: value,
    }
    lines = error_lines(config_check(tmp_path, environment))
    assert len(lines) == 1, lines
    assert problem in lines[0]
    assert variable in lines[0]
    assert "SECRET" not in lines[0]
    assert base64.b64encode(b"SECRET16").decode() not in lines[0]


def test_env_source_needs_key(tmp_path: Path) -> None:
    """The env key source without a key is a configuration error."""
    environment = {"MOORAGE_ENCRYPTION_KEY_SOURCE": "env"}
    lines = error_lines(config_check(tmp_path, environment))
    assert lines == [
        "invalid configuration: encryption_key_source is env but encryption_key "
        "(MOORAGE_ENCRYPTION_KEY) is unset"
    ]


def test_file_errors_name_file(tmp_path: Path) -> None:
    """Errors in moorage.toml name the file: a wrong type, an unknown key, and
    a file that is not TOML."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = data_dir / "moorage.toml"
    config.write_text('port = "x"\nbogus = 1\n')
    lines = error_lines(config_check(tmp_path, {}))
    assert len(lines) == 2, lines
    assert lines[0].startswith("invalid configuration: port = 'x' (file data/")
    assert (
        lines[1]
        == "invalid configuration: bogus (file data/moorage.toml): unknown setting"
    )
    config.write_text("port = \n")
    lines = error_lines(config_check(tmp_path, {}))
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "invalid configuration: data/moorage.toml is not valid TOML"
    )


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("postgresql+asyncpg://u:DBSECRET@127.0.0.1:99999/db", "99999"),
        ("postgresql+asyncpg://u:DBSECRET@127.0.0.1:abc/db", "abc"),
        ("postgresql+asyncpg://u:DBSECRET@127.0.0.1:0/db", "0"),
        ("postgresql+asyncpg://u:DBSECRET@[::1]:70000/db", "70000"),
        ("postgresql+asyncpg://u:DB/SECRET@127.0.0.1:99999/db", "99999"),
        (
            "postgresql+asyncpg://u:DBSECRET@127.0.0.1:\u0665\u0664\u0663\u0662/db",
            "\u0665\u0664\u0663\u0662",
        ),
    ],
)
def test_invalid_database_port_one_line(tmp_path: Path, url: str, port: str) -> None:
    """A database URL whose port is not a number from 1 to 65535 is reported
    with the other invalid values, without the password."""
    environment = {"MOORAGE_DATABASE_URL": url, "MOORAGE_PORT": "abc"}
    lines = error_lines(config_check(tmp_path, environment))
    assert len(lines) == 2, lines
    database_line = next(line for line in lines if "database_url" in line)
    assert "MOORAGE_DATABASE_URL" in database_line
    assert f"invalid port {port!r}" in database_line
    assert "1 to 65535" in database_line
    assert "u:***@" in database_line
    assert "DBSECRET" not in "\n".join(lines)
    assert "SECRET" not in "\n".join(lines)


def test_serve_rejects_invalid_database_port(tmp_path: Path) -> None:
    """`moorage serve` reports an invalid database port as a configuration
    error before it starts, without a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env["MOORAGE_DATABASE_URL"] = "postgresql+asyncpg://u:DBSECRET@127.0.0.1:99999/db"
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", "serve", "--port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    lines = error_lines(completed)
    assert len(lines) == 1, lines
    assert lines[0].startswith("invalid configuration: database_url = ")
    assert "invalid port '99999'" in lines[0]
    assert "DBSECRET" not in completed.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:DBSECRET@127.0.0.1:5432/db",
        "sqlite+pysqlite:////var/lib/moorage/moorage.db",
        "mysql+aiomysql://u:DBSECRET@127.0.0.1/db",
    ],
)
def test_unsupported_database_driver(tmp_path: Path, url: str) -> None:
    """A database URL with a driver other than the two supported async ones is a
    configuration error that names the drivers to use."""
    lines = error_lines(config_check(tmp_path, {"MOORAGE_DATABASE_URL": url}))
    assert len(lines) == 1, lines
    assert "MOORAGE_DATABASE_URL" in lines[0]
    driver = url.partition(":")[0]
    assert f"unsupported database driver {driver!r}" in lines[0]
    assert "postgresql+asyncpg://" in lines[0]
    assert "sqlite+aiosqlite://" in lines[0]
    assert "DBSECRET" not in lines[0]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://u:DBSECRET@127.0.0.1:5432/db",
            "postgresql+asyncpg://u:***@127.0.0.1:5432/db",
        ),
        (
            "postgres://u@db.internal/moorage",
            "postgresql+asyncpg://u@db.internal/moorage",
        ),
        (
            "sqlite:////var/lib/moorage/moorage.db",
            "sqlite+aiosqlite:////var/lib/moorage/moorage.db",
        ),
        (
            "POSTGRESQL://u:DB/SE?CR#ET@127.0.0.1:5432/db",
            "postgresql+asyncpg://u:***@127.0.0.1:5432/db",
        ),
    ],
)
def test_database_url_without_driver(tmp_path: Path, url: str, shown: str) -> None:
    """A database URL that names no driver, as libpq writes them, gets the
    driver Moorage installs for its database."""
    completed = config_check(tmp_path, {"MOORAGE_DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr
    assert shown in completed.stdout
    assert "DBSECRET" not in completed.stdout
    assert "SE?CR" not in completed.stdout


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"]
)
def test_sqlite_url_without_file(tmp_path: Path, url: str) -> None:
    """A SQLite URL without a file, an in-memory database that each process
    would see empty, is a configuration error."""
    lines = error_lines(config_check(tmp_path, {"MOORAGE_DATABASE_URL": url}))
    assert len(lines) == 1, lines
    assert "a SQLite URL needs a file" in lines[0]


def test_empty_database_url_means_sqlite(tmp_path: Path) -> None:
    """An empty database URL selects the default SQLite database, as before
    the URL was checked."""
    completed = config_check(tmp_path, {"MOORAGE_DATABASE_URL": ""})
    assert completed.returncode == 0, completed.stderr
    assert "database_url = \n" in completed.stdout


@pytest.mark.parametrize(
    ("entry", "network", "address"),
    [
        ("10.0.0.1/8", "10.0.0.0/8", "10.0.0.1"),
        ("2001:db8::1/32", "2001:db8::/32", "2001:db8::1"),
    ],
)
def test_trusted_proxy_with_host_bits(
    tmp_path: Path, entry: str, network: str, address: str
) -> None:
    """A trusted proxy network with host bits set is refused with both readings,
    because trusting the network by mistake lets its hosts forge addresses."""
    environment = {"MOORAGE_TRUSTED_PROXIES": json.dumps(["127.0.0.1", entry])}
    lines = error_lines(config_check(tmp_path, environment))
    assert len(lines) == 1, lines
    assert "MOORAGE_TRUSTED_PROXIES" in lines[0]
    assert f"give the network {network}, or the address {address}" in lines[0]


def test_trusted_proxies_accepted(tmp_path: Path) -> None:
    """Addresses and networks without host bits pass, in any spelling."""
    environment = {
        "MOORAGE_TRUSTED_PROXIES": json.dumps(
            ["127.0.0.1", "10.0.0.0/8", "2001:DB8::/32"]
        )
    }
    completed = config_check(tmp_path, environment)
    assert completed.returncode == 0, completed.stderr
    assert "warning" not in completed.stderr


@pytest.mark.parametrize(
    "entry",
    ["0.0.0.0/0", "::/0", "8.0.0.0/7", "2000::/3", "::ffff:0:0/96"],
)
def test_wide_trusted_proxy_warned(tmp_path: Path, entry: str) -> None:
    """A trusted proxy network wider than /8 (IPv4, also IPv4-mapped) or /32
    (IPv6) passes the check with one warning line on stderr."""
    environment = {"MOORAGE_TRUSTED_PROXIES": json.dumps(["127.0.0.1", entry])}
    completed = config_check(tmp_path, environment)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: trusted_proxies entry {entry} is wider")
    assert "forge the source address in the audit log" in lines[0]
    assert f"trusted_proxies = [127.0.0.1, {entry}]" in completed.stdout
