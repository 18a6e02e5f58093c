"""Behind a reverse proxy: the token realm, Location and Link URLs, and the
client address used for throttling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.database import create_database, drop_database
from tests.support.identity import admin_client, push_image
from tests.support.server import ServerProcess

FORWARDED = {
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "registry.example.com",
    "X-Forwarded-For": "203.0.113.9",
}


def start_server(path: Path, **env: str) -> ServerProcess:
    path.mkdir()
    process = ServerProcess(
        data_dir=path, database_url=create_database(path), extra_env=env
    )
    process.start()
    return process


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that trusts X-Forwarded-* headers from the loopback address."""
    process = start_server(
        tmp_path_factory.mktemp("proxied") / "data",
        MOORAGE_TRUSTED_PROXIES='["127.0.0.1/32"]',
    )
    yield process
    process.stop()
    drop_database(process.database_url)


def realm(response: httpx.Response) -> str:
    challenge = response.headers["WWW-Authenticate"]
    return challenge.split('realm="', 1)[1].split('"', 1)[0]


def test_realm_from_trusted_proxy(proxied: ServerProcess) -> None:
    """A trusted proxy's forwarded scheme and host make the realm."""
    response = httpx.get(f"{proxied.url}/v2/", headers=FORWARDED)
    assert response.status_code == 401
    assert realm(response) == "https://registry.example.com/token"


def test_realm_ignores_untrusted_headers(server: ServerProcess) -> None:
    """Without trusted proxies the forwarded headers are ignored."""
    response = httpx.get(f"{server.url}/v2/", headers=FORWARDED)
    assert realm(response) == f"{server.url}/token"


@pytest.mark.parametrize(
    "host", ['a"b, x="y', "evil.example/path", "host:port", "[::1", "-dash"]
)
def test_realm_ignores_invalid_host(server: ServerProcess, host: str) -> None:
    """A Host header that is not a host and port never reaches the challenge."""
    response = httpx.get(f"{server.url}/v2/", headers={"Host": host})
    assert response.status_code == 401
    assert realm(response) == f"{server.url}/token"
    assert response.headers["WWW-Authenticate"].count('"') == 4


def test_realm_ignores_invalid_forwarded_values(proxied: ServerProcess) -> None:
    """A trusted proxy's forwarded values are used only when they are valid."""
    headers = {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": 'a"b'}
    response = httpx.get(f"{proxied.url}/v2/", headers=headers)
    assert realm(response) == f"{proxied.url}/token"


def test_realm_from_public_url(tmp_path: Path) -> None:
    """A configured public_url wins over every header."""
    process = start_server(
        tmp_path / "data",
        MOORAGE_PUBLIC_URL="https://registry.example.org/",
        MOORAGE_TRUSTED_PROXIES='["127.0.0.1/32"]',
    )
    try:
        response = httpx.get(f"{process.url}/v2/", headers=FORWARDED)
        assert realm(response) == "https://registry.example.org/token"
    finally:
        process.stop()
        drop_database(process.database_url)


def test_location_and_link_are_relative(proxied: ServerProcess) -> None:
    """Location and Link carry paths, which the client resolves against the
    proxy's URL it used, so they stay right behind any proxy."""
    with admin_client(proxied) as client:
        push_image(client, "vendor/app", "a")
        push_image(client, "vendor/app", "b")
        started = client.post("/v2/vendor/app/blobs/uploads/", headers=FORWARDED)
        tags = client.get(
            "/v2/vendor/app/tags/list", params={"n": 1}, headers=FORWARDED
        )
    assert started.headers["Location"].startswith("/v2/vendor/app/blobs/uploads/")
    assert tags.headers["Link"].startswith("</v2/vendor/app/tags/list?")


def test_throttle_uses_forwarded_client(proxied: ServerProcess) -> None:
    """Failed logins count against the client address a trusted proxy forwards,
    so one client's guessing does not slow another behind the same proxy."""
    customer = proxied.add_customer()
    login, password = proxied.add_user(customer, "reader")
    guesser = {"X-Forwarded-For": "198.51.100.1"}
    colleague = {"X-Forwarded-For": "198.51.100.2"}
    for index in range(5):
        response = httpx.get(
            f"{proxied.url}/v2/", auth=(login, f"guess-{index}"), headers=guesser
        )
        assert response.status_code == 401
    blocked = httpx.get(f"{proxied.url}/v2/", auth=(login, password), headers=guesser)
    assert blocked.status_code == 429
    allowed = httpx.get(f"{proxied.url}/v2/", auth=(login, password), headers=colleague)
    assert allowed.status_code == 200
    assert '"client": "198.51.100.1"' in proxied.log()


def test_start_warns_of_wide_trusted_proxies(tmp_path: Path) -> None:
    """A server that trusts every IPv4 and IPv6 client logs one warning for each
    such network at start, and none for a narrow one."""
    process = start_server(
        tmp_path / "data",
        MOORAGE_TRUSTED_PROXIES='["0.0.0.0/0", "::/0", "10.0.0.0/8"]',
    )
    try:
        log = process.log()
    finally:
        process.stop()
        drop_database(process.database_url)
    warnings = [line for line in log.splitlines() if "trusted_proxies entry" in line]
    assert len(warnings) == 2, warnings
    assert "trusted_proxies entry 0.0.0.0/0 is wider than /8" in warnings[0]
    assert "trusted_proxies entry ::/0 is wider than /8" in warnings[1]
    assert "forge the source address in the audit log" in warnings[0]
    assert '"level": "warning"' in warnings[0]
