"""`GET /v2/`, the token challenge and the token endpoint."""

from __future__ import annotations

import httpx

from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess


def test_version_check_without_credentials_challenges(server: ServerProcess) -> None:
    """An anonymous /v2/ gets 401 with a Bearer challenge and the API version."""
    response = httpx.get(f"{server.url}/v2/")
    assert response.status_code == 401
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{server.url}/token"' in challenge
    assert 'service="moorage"' in challenge
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_version_check_with_basic_credentials(admin_client: httpx.Client) -> None:
    """HTTP Basic is accepted on /v2/."""
    response = admin_client.get("/v2/")
    assert response.status_code == 200
    assert response.json() == {}


def test_version_check_with_wrong_password(server: ServerProcess) -> None:
    """A wrong password gets 401, not a partial success."""
    response = httpx.get(f"{server.url}/v2/", auth=(ADMIN_LOGIN, "not-the-password"))
    assert response.status_code == 401


def test_token_then_bearer_request(server: ServerProcess) -> None:
    """A token from /token opens /v2/ for the bearer."""
    token = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "scope": "registry:catalog:*"},
        auth=(ADMIN_LOGIN, ADMIN_PASSWORD),
    ).json()
    assert token["token"] == token["access_token"]
    assert token["expires_in"] > 0
    response = httpx.get(
        f"{server.url}/v2/", headers={"Authorization": f"Bearer {token['token']}"}
    )
    assert response.status_code == 200


def test_token_endpoint_rejects_bad_credentials(server: ServerProcess) -> None:
    """Bad credentials at /token get 401 with a Basic challenge."""
    response = httpx.get(f"{server.url}/token", auth=("nobody", "nothing-at-all"))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic ")
