"""podman against Moorage's token service: login, push, pull with a refresh
token, a pull after the access token expired, then a revoked account."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moorage import admin
from tests.support.database import create_database, drop_database
from tests.support.identity import add_robot
from tests.support.images import OciLayout, busybox_image
from tests.support.receivers import wait_until
from tests.support.server import ServerProcess

# Short enough to watch a token expire; 5 s is the configured minimum.
TOKEN_TTL = 5
# The server accepts tokens up to this long after exp (clock skew leeway).
LEEWAY = 5

pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman missing"),
]


@pytest.fixture(scope="module")
def short_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose access tokens live TOKEN_TTL seconds."""
    data_dir = tmp_path_factory.mktemp("short") / "data"
    data_dir.mkdir()
    process = ServerProcess(
        data_dir=data_dir,
        database_url=create_database(data_dir),
        extra_env={"MOORAGE_TOKEN_TTL_SECONDS": str(TOKEN_TTL)},
    )
    process.start()
    yield process
    process.stop()
    drop_database(process.database_url)


class Podman:
    """podman with its own storage and auth file under a temporary directory."""

    def __init__(self, root: Path, authfile: Path) -> None:
        self.root = root
        self.authfile = authfile

    def run(
        self, *args: str, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [
            "podman",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "vfs",
            *args,
        ]
        return subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=300
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"podman {args} failed: {result.stderr}"
        return result.stdout

    def registry_args(self) -> list[str]:
        return ["--tls-verify=false", "--authfile", str(self.authfile)]


def write_identity_token(
    authfile: Path, registry: str, login: str, refresh_token: str
) -> None:
    """Write an auth file with an identity token, as `docker login` stores one:
    `auth` contains the login name and an empty password."""
    auth = base64.b64encode(f"{login}:".encode()).decode()
    entry = {"auth": auth, "identitytoken": refresh_token}
    authfile.write_text(json.dumps({"auths": {registry: entry}}))


def oauth_requests(server: ServerProcess) -> int:
    """Count successful POST /token requests in the server log."""
    count = 0
    for line in server.log().splitlines():
        if '"route": "oauth_token"' in line and '"status": 200' in line:
            count += 1
    return count


@pytest.fixture
def podman_root() -> Iterator[Path]:
    """A short directory for podman's storage: podman rejects a runroot path
    longer than 50 characters, which pytest's tmp_path often is."""
    root = Path(tempfile.mkdtemp(prefix="moorage-podman-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_podman_refresh_and_revocation(
    short_server: ServerProcess, tmp_path: Path, podman_root: Path
) -> None:
    """podman logs in, pushes, pulls with a refresh token before and after the
    access token expired, and is refused once the robot is disabled."""
    server = short_server
    registry = server.address
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "writer", name="ci")
    image = f"{registry}/{customer}/busybox:1"

    layout = OciLayout(tmp_path / "layout")
    busybox_image(layout, "latest")
    password_auth = tmp_path / "password-auth.json"
    podman = Podman(podman_root, password_auth)
    podman.ok(
        "login",
        *podman.registry_args(),
        "-u",
        login,
        "--password-stdin",
        registry,
        stdin=secret,
    )
    podman.ok("pull", "-q", f"oci:{layout.path}:latest")
    local = podman.ok("images", "-q").split()[0]
    podman.ok("tag", local, image)
    podman.ok("push", "-q", *podman.registry_args(), image)
    podman.ok("rmi", "-f", image)

    refresh = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "offline_token": "true", "client_id": "test"},
        auth=(login, secret),
    ).json()
    token_auth = tmp_path / "token-auth.json"
    write_identity_token(token_auth, registry, login, refresh["refresh_token"])
    refreshing = Podman(podman_root, token_auth)

    before = oauth_requests(server)
    refreshing.ok("pull", "-q", *refreshing.registry_args(), image)
    assert wait_until(lambda: oauth_requests(server) > before)
    refreshing.ok("rmi", "-f", image)

    time.sleep(TOKEN_TTL + LEEWAY + 1)
    expired = httpx.get(
        f"{server.url}/v2/", headers={"Authorization": f"Bearer {refresh['token']}"}
    )
    assert expired.status_code == 401
    before = oauth_requests(server)
    refreshing.ok("pull", "-q", *refreshing.registry_args(), image)
    assert wait_until(lambda: oauth_requests(server) > before)
    refreshing.ok("rmi", "-f", image)

    server.run_admin(
        lambda s: admin.set_enabled(s.identity, customer, login, "robot", False)
    )
    refused = refreshing.run("pull", "-q", *refreshing.registry_args(), image)
    assert refused.returncode != 0
    assert "401" in refused.stderr or "unauthorized" in refused.stderr.lower()
    refused = podman.run("pull", "-q", *podman.registry_args(), image)
    assert refused.returncode != 0
