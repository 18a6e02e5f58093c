"""A data directory restored without its key-encryption keys: `moorage serve` and
the other commands stop with one line naming the missing keys, and create no
new key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from moorage.db.engine import create_engine
from tests.support.database import create_database, drop_database
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique

BLOB = b"restored-without-keys-" * 1000
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def stopped_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A registry that stored one blob and was stopped; yields it and the blob's
    repository."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    repository = f"products/{unique('restore')}"
    server.start()
    try:
        with httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD), timeout=30
        ) as client:
            response = client.post(
                f"/v2/{repository}/blobs/uploads/",
                params={"digest": DIGEST},
                content=BLOB,
            )
            assert response.status_code == 201, response.text
    finally:
        server.stop()
    yield server, repository
    server.stop()
    drop_database(server.database_url)


def moorage(server: ServerProcess, *arguments: str) -> subprocess.CompletedProcess[str]:
    env = server.environment()
    return subprocess.run(
        [sys.executable, "-m", "moorage", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Return stderr without the JSON log lines the server writes."""
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


def test_serve_without_key_directory(
    stopped_server: tuple[ServerProcess, str],
) -> None:
    """Without `keys/`, serve names the missing key and where it looked, and
    creates no key; with the directory back, the blob pulls again."""
    server, repository = stopped_server
    keys = server.data_dir / "keys"
    key_id = (keys / "active").read_text().strip()
    backup = server.data_dir.parent / "keys-backup"
    shutil.move(keys, backup)

    result = moorage(server, "serve", "--port", str(server.port))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert key_id in lines[0]
    assert str(keys) in lines[0]
    assert not keys.exists()

    shutil.move(backup, keys)
    server.start()
    response = httpx.get(
        f"{server.url}/v2/{repository}/blobs/{DIGEST}",
        auth=(ADMIN_LOGIN, ADMIN_PASSWORD),
    )
    assert response.status_code == 200
    assert response.content == BLOB


def test_command_without_key_directory(
    stopped_server: tuple[ServerProcess, str],
) -> None:
    """Other commands stop with the same one line and create no key either."""
    server, _ = stopped_server
    keys = server.data_dir / "keys"
    key_id = (keys / "active").read_text().strip()
    shutil.rmtree(keys)

    result = moorage(server, "customer", "list")

    assert result.returncode == 1, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert key_id in lines[0]
    assert not keys.exists()


def test_serve_with_other_environment_key(tmp_path: Path) -> None:
    """With the env key source, a different MOORAGE_ENCRYPTION_KEY is named as
    the wrong source and no data is written under it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    first = base64.b64encode(os.urandom(32)).decode()
    server = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env={
            "MOORAGE_ENCRYPTION_KEY_SOURCE": "env",
            "MOORAGE_ENCRYPTION_KEY": first,
        },
    )
    try:
        server.start()
        server.stop()
        server.extra_env["MOORAGE_ENCRYPTION_KEY"] = base64.b64encode(
            os.urandom(32)
        ).decode()

        result = moorage(server, "serve", "--port", str(server.port))

        assert result.returncode == 1, result.stderr
        lines = error_lines(result)
        assert len(lines) == 1, result.stderr
        assert "env-" in lines[0]
        assert "MOORAGE_ENCRYPTION_KEY" in lines[0]
    finally:
        server.stop()
        drop_database(server.database_url)


CORRUPT_KEYS = {
    "not base64": ("garbage!!\n", "it is not valid base64"),
    "16 bytes": (
        base64.b64encode(os.urandom(16)).decode() + "\n",
        "it decodes to 16 bytes; expected base64 of 32 bytes",
    ),
    "empty": ("", "it is empty"),
}


@pytest.mark.parametrize("command", [["key", "status"], ["audit", "list"], ["serve"]])
@pytest.mark.parametrize("content", CORRUPT_KEYS.values(), ids=list(CORRUPT_KEYS))
def test_corrupt_key_file_one_line(
    stopped_server: tuple[ServerProcess, str],
    command: list[str],
    content: tuple[str, str],
) -> None:
    """A damaged active key file stops every command with one line that names
    the file and what is wrong with it."""
    server, _ = stopped_server
    keys = server.data_dir / "keys"
    key_file = keys / f"{(keys / 'active').read_text().strip()}.key"
    text, problem = content
    key_file.write_text(text)
    if command == ["serve"]:
        command = [*command, "--port", str(server.port)]

    result = moorage(server, *command)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in error_lines(result) if not line.startswith("warning:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: key file {key_file.resolve()} is invalid: ")
    assert problem in lines[0]
    assert sorted(path.name for path in keys.iterdir()) == ["active", key_file.name]


def test_wrong_key_file_names_it(stopped_server: tuple[ServerProcess, str]) -> None:
    """A key file replaced by another valid key is named as not the key the
    data was sealed with."""
    server, _ = stopped_server
    keys = server.data_dir / "keys"
    key_id = (keys / "active").read_text().strip()
    key_file = keys / f"{key_id}.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")

    for command in (["customer", "list"], ["serve", "--port", str(server.port)]):
        result = moorage(server, *command)

        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in error_lines(result) if not line.startswith("warning")]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"error: key-encryption key {key_id} from key file {key_file.resolve()} "
            "is not the key the data was sealed with"
        )


async def table_count(database_url: str) -> int:
    """Count the tables in a PostgreSQL database."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            count = await connection.scalar(
                text(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = 'public'"
                )
            )
    finally:
        await engine.dispose()
    return int(count or 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"MOORAGE_PKCS11_LIBRARY": "/nonexistent/libpkcs11.so"},
            "error: PKCS#11 library /nonexistent/libpkcs11.so does not exist; set "
            "pkcs11_library to the path of the module's shared library",
        ),
        (
            {"MOORAGE_PKCS11_PIN": ""},
            "error: the PIN for PKCS#11 token 'moorage-test' is empty; set "
            "pkcs11_pin (MOORAGE_PKCS11_PIN) to the token's user PIN",
        ),
        (
            {"MOORAGE_PKCS11_PIN": "0000-wrong-pin"},
            "error: the PIN for PKCS#11 token 'moorage-test' is incorrect; set "
            "pkcs11_pin (MOORAGE_PKCS11_PIN) to the token's user PIN. Tokens "
            "may lock the PIN after repeated failures",
        ),
        (
            {"MOORAGE_PKCS11_TOKEN": "no-such-token"},
            "error: PKCS#11 token 'no-such-token' not found in",
        ),
    ],
    ids=["missing library", "empty PIN", "wrong PIN", "unknown token"],
)
def test_pkcs11_first_start_errors(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    """An unusable PKCS#11 setting stops the first start with one line naming
    it, before the data directory or the database schema is created."""
    from tests.support.softhsm import init_token

    hsm = init_token(tmp_path / "hsm")
    data_dir = tmp_path / "data"
    server = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env={**hsm.environment(), **change},
    )
    try:
        result = moorage(server, "serve", "--port", str(server.port))

        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        lines = error_lines(result)
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(message)
        assert not data_dir.exists()
        if server.database_url.startswith("postgresql"):
            assert asyncio.run(table_count(server.database_url)) == 0
    finally:
        drop_database(server.database_url)
