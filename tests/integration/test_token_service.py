"""The token service: scopes, the OAuth2 form, refresh tokens, keys and attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage import admin
from moorage.auth.tokens import add_signing_key, open_signing_key
from moorage.db.identity_store import SigningKeyRecord
from moorage.services import Services
from tests.support.identity import (
    add_grant,
    add_robot,
    admin_client,
    bearer,
    get_token,
    push_image,
)
from tests.support.server import ServerProcess, unique


def access_of(token: dict[str, Any]) -> list[dict[str, Any]]:
    claims = jwt.decode(str(token["token"]), options={"verify_signature": False})
    return list(claims["access"])


@pytest.fixture(scope="module")
def customer(server: ServerProcess) -> str:
    """A customer with one image in its namespace."""
    slug = server.add_customer()
    with admin_client(server) as client:
        push_image(client, f"{slug}/app")
    return slug


@pytest.fixture(scope="module")
def reader(server: ServerProcess, customer: str) -> tuple[str, str]:
    return server.add_user(customer, "reader")


@pytest.fixture(scope="module")
def writer(server: ServerProcess, customer: str) -> tuple[str, str]:
    return server.add_user(customer, "writer")


def signing_key(server: ServerProcess) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """Return the kid and private key the server signs with now."""

    async def newest(services: Services) -> SigningKeyRecord:
        records = await services.identity.active_signing_keys()
        return open_signing_key(records[0], services.tokens.codec)

    record = server.run_admin(newest)
    key = serialization.load_pem_private_key(record.private_key.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return record.kid, key


# Scopes


def test_several_scope_parameters(
    server: ServerProcess, customer: str, writer: tuple[str, str]
) -> None:
    """Scopes in several parameters and space-separated ones are all granted."""
    one, two, three = (f"{customer}/{n}" for n in ("one", "two", "three"))
    token = get_token(
        server,
        *writer,
        f"repository:{one}:pull",
        f"repository:{two}:push,pull repository:{three}:pull",
    )
    granted = {entry["name"]: sorted(entry["actions"]) for entry in access_of(token)}
    assert granted == {one: ["pull"], two: ["pull", "push"], three: ["pull"]}


def test_intersection_never_an_error(
    server: ServerProcess, customer: str, reader: tuple[str, str]
) -> None:
    """Asking more than allowed gets 200 with the allowed part only."""
    other = server.add_customer()
    token = get_token(
        server,
        *reader,
        f"repository:{customer}/app:push,pull,delete",
        f"repository:{other}/app:pull",
        "repository:bogus name:pull",
        "unknown:thing:read",
    )
    assert access_of(token) == [
        {"type": "repository", "name": f"{customer}/app", "actions": ["pull"]}
    ]
    assert token["scope"] == f"repository:{customer}/app:pull"


def test_catalog_and_plugin_scopes(
    server: ServerProcess, customer: str, reader: tuple[str, str]
) -> None:
    """registry:catalog:* and repository(plugin) scopes are accepted."""
    token = get_token(
        server,
        *reader,
        "registry:catalog:*",
        f"repository(plugin):{customer}/app:pull",
    )
    assert {entry["type"] for entry in access_of(token)} == {"registry", "repository"}
    response = httpx.get(f"{server.url}/v2/_catalog", headers=bearer(token))
    assert response.status_code == 200
    assert f"{customer}/app" in response.json()["repositories"]


def test_token_response_fields(server: ServerProcess, reader: tuple[str, str]) -> None:
    """The response has token, access_token, expires_in and an RFC 3339 issued_at."""
    token = get_token(server, *reader)
    assert token["token"] == token["access_token"]
    assert token["expires_in"] == 300
    issued = time.strptime(str(token["issued_at"]), "%Y-%m-%dT%H:%M:%SZ")
    assert abs(time.mktime(issued) - time.mktime(time.gmtime())) < 60
    assert "refresh_token" not in token


# Refresh tokens and the OAuth2 form


def test_offline_token_gives_refresh_token(
    server: ServerProcess, customer: str, reader: tuple[str, str]
) -> None:
    """offline_token=true returns a refresh token that the POST form accepts."""
    response = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "offline_token": "true", "client_id": "docker"},
        auth=reader,
    )
    refresh = response.json()["refresh_token"]
    renewed = httpx.post(
        f"{server.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": "moorage",
            "client_id": "docker",
            "scope": f"repository:{customer}/app:pull",
        },
    )
    assert renewed.status_code == 200
    assert access_of(renewed.json())[0]["name"] == f"{customer}/app"
    tags = httpx.get(
        f"{server.url}/v2/{customer}/app/tags/list", headers=bearer(renewed.json())
    )
    assert tags.status_code == 200


def test_password_grant(
    server: ServerProcess, customer: str, reader: tuple[str, str]
) -> None:
    """The password grant with access_type=offline returns a refresh token."""
    response = httpx.post(
        f"{server.url}/token",
        data={
            "grant_type": "password",
            "username": reader[0],
            "password": reader[1],
            "service": "moorage",
            "client_id": "podman",
            "access_type": "offline",
            "scope": f"repository:{customer}/app:pull repository:{customer}/x:pull",
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert "refresh_token" in body
    assert len(access_of(body)) == 2


def test_password_grant_wrong_password(
    server: ServerProcess, reader: tuple[str, str]
) -> None:
    """A wrong password in the form gets 401."""
    response = httpx.post(
        f"{server.url}/token",
        data={"grant_type": "password", "username": reader[0], "password": "nope"},
    )
    assert response.status_code == 401


def test_unknown_grant_type(server: ServerProcess) -> None:
    """An unsupported grant type gets 400."""
    response = httpx.post(f"{server.url}/token", data={"grant_type": "magic"})
    assert response.status_code == 400


def test_token_service_name_checked(
    server: ServerProcess, reader: tuple[str, str]
) -> None:
    """GET and POST /token reject a service other than the registry's with 400,
    and accept the registry's own service or none."""
    login, password = reader
    for params in ({"service": "moorage"}, {}):
        response = httpx.get(f"{server.url}/token", params=params, auth=reader)
        assert response.status_code == 200, (params, response.text)

    response = httpx.get(
        f"{server.url}/token", params={"service": "other.example"}, auth=reader
    )
    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"] == {"service": "other.example", "expected": "moorage"}
    assert "other.example" in error["message"]

    response = httpx.post(
        f"{server.url}/token",
        data={
            "grant_type": "password",
            "username": login,
            "password": password,
            "service": "other.example",
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    form = {
        "grant_type": "password",
        "username": login,
        "password": password,
        "service": "moorage",
    }
    response = httpx.post(f"{server.url}/token", data=form)
    assert response.status_code == 200, response.text


def test_refresh_token_not_a_bearer(
    server: ServerProcess, reader: tuple[str, str]
) -> None:
    """A refresh token is no access token, and an access token no refresh token."""
    response = httpx.get(
        f"{server.url}/token", params={"offline_token": "true"}, auth=reader
    )
    body = response.json()
    as_bearer = httpx.get(
        f"{server.url}/v2/",
        headers={"Authorization": f"Bearer {body['refresh_token']}"},
    )
    assert as_bearer.status_code == 401
    as_refresh = httpx.post(
        f"{server.url}/token",
        data={"grant_type": "refresh_token", "refresh_token": body["token"]},
    )
    assert as_refresh.status_code == 401


def test_refresh_after_revocation(server: ServerProcess) -> None:
    """A refresh token stops working when the robot's secret is rotated."""
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "reader", name="ci")
    refresh = httpx.get(
        f"{server.url}/token", params={"offline_token": "true"}, auth=(login, secret)
    ).json()["refresh_token"]
    form = {"grant_type": "refresh_token", "refresh_token": refresh}
    assert httpx.post(f"{server.url}/token", data=form).status_code == 200
    server.run_admin(lambda s: admin.rotate_robot(s.identity, customer, "ci"))
    assert httpx.post(f"{server.url}/token", data=form).status_code == 401


def test_token_dies_with_removed_account(server: ServerProcess) -> None:
    """A bearer token of a removed account stays revoked when an account with
    the same login is created again, for users and robots alike."""
    customer = server.add_customer()
    repository = f"{customer}/app"
    scope = f"repository:{repository}:pull"
    login, password = server.add_user(customer, "reader")
    robot, secret = add_robot(server, customer, "reader", name="ci")
    tokens = {
        login: get_token(server, login, password, scope),
        robot: get_token(server, robot, secret, scope),
    }
    server.run_admin(lambda s: admin.remove_user(s.identity, customer, login))
    server.run_admin(lambda s: admin.remove_robot(s.identity, customer, "ci"))
    server.add_user(customer, "reader", login=login)
    assert add_robot(server, customer, "reader", name="ci")[0] == robot

    for account, token in tokens.items():
        response = httpx.get(
            f"{server.url}/v2/{repository}/tags/list", headers=bearer(token)
        )
        assert response.status_code == 401, account
        assert "revoked" in response.text, account


def test_refresh_follows_grant_removal(server: ServerProcess) -> None:
    """Tokens refreshed after a grant is removed no longer carry it."""
    customer = server.add_customer()
    product = f"{unique('prod')}/app"
    login, password = server.add_user(customer, "reader")
    grant_id = add_grant(server, customer, product, "reader")
    refresh = httpx.get(
        f"{server.url}/token", params={"offline_token": "true"}, auth=(login, password)
    ).json()["refresh_token"]
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "scope": f"repository:{product}:pull",
    }
    assert access_of(httpx.post(f"{server.url}/token", data=form).json())
    server.run_admin(lambda s: admin.remove_grant(s.identity, customer, grant_id))
    assert access_of(httpx.post(f"{server.url}/token", data=form).json()) == []


# Keys


def test_jwks_verifies_tokens(server: ServerProcess, reader: tuple[str, str]) -> None:
    """The JWKS contains the key that verifies an issued token."""
    token = str(get_token(server, *reader)["token"])
    kid = jwt.get_unverified_header(token)["kid"]
    keys = httpx.get(f"{server.url}/token/jwks").json()["keys"]
    jwk = next(key for key in keys if key["kid"] == kid)
    public_key = jwt.PyJWK(jwk).key
    claims = jwt.decode(token, public_key, algorithms=["ES256"], audience="moorage")
    assert claims["sub"] == reader[0]


def test_signing_key_rotation(fresh_server: ServerProcess) -> None:
    """After rotation new tokens carry the new kid and old ones verify during the
    overlap. With no overlap, old tokens are rejected within the reload interval."""
    server = fresh_server
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    old = get_token(server, login, password)
    old_kid = jwt.get_unverified_header(str(old["token"]))["kid"]
    new_kid = server.run_admin(
        lambda s: add_signing_key(s.identity, 3600, s.tokens.codec)
    )
    # A token of the new key is accepted at once: an unknown kid forces a reload.
    kid, key = signing_key(server)
    assert kid == new_kid
    claims = jwt.decode(str(old["token"]), options={"verify_signature": False})
    forged_new = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    assert httpx.get(
        f"{server.url}/v2/", headers={"Authorization": f"Bearer {forged_new}"}
    ).is_success
    assert httpx.get(f"{server.url}/v2/", headers=bearer(old)).is_success
    kids = {
        entry["kid"] for entry in httpx.get(f"{server.url}/token/jwks").json()["keys"]
    }
    assert kids == {old_kid, new_kid}
    fresh = get_token(server, login, password)
    assert jwt.get_unverified_header(str(fresh["token"]))["kid"] == new_kid

    server.run_admin(lambda s: add_signing_key(s.identity, 0, s.tokens.codec))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/v2/", headers=bearer(old)).status_code == 401:
            break
        time.sleep(1)
    assert httpx.get(f"{server.url}/v2/", headers=bearer(old)).status_code == 401


# Attacks


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{signature}"


@pytest.fixture(scope="module")
def genuine(server: ServerProcess, customer: str, reader: tuple[str, str]) -> str:
    """A valid pull token of the reader."""
    return str(get_token(server, *reader, f"repository:{customer}/app:pull")["token"])


def hmac_forgery(claims: dict[str, Any], kid: str, secret: bytes) -> str:
    """Sign with HS256 by hand: PyJWT rejects a PEM public key as an HMAC key."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def attacks(server: ServerProcess, genuine: str, customer: str) -> dict[str, str]:
    """Return forged tokens by name; each one tries to reach the reader's
    repository or push to it."""
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    kid, key = signing_key(server)
    stranger = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())

    def signed(**changes: Any) -> str:
        return jwt.encode(
            {**claims, **changes}, key, algorithm="ES256", headers={"kid": kid}
        )

    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    push = {
        "type": "repository",
        "name": f"{customer}/app",
        "actions": ["pull", "push"],
    }
    signature = genuine.rpartition(".")[2]
    # Past the recursion limit of json.loads (1000 by default), small enough
    # for a request header.
    nested = b64(b"[" * 2000 + b"]" * 2000)

    return {
        "alg-none": unsigned({"alg": "none", "typ": "JWT", "kid": kid}, claims, ""),
        "hmac-with-public-key": hmac_forgery(claims, kid, public_pem),
        "tampered-claims": unsigned(header, {**claims, "access": [push]}, signature),
        "re-signed-other-key": jwt.encode(
            claims, stranger, algorithm="ES256", headers={"kid": kid}
        ),
        "unknown-kid": jwt.encode(
            claims, stranger, algorithm="ES256", headers={"kid": "AAAA:BBBB"}
        ),
        "expired": signed(iat=now - 700, nbf=now - 700, exp=now - 600),
        "not-yet-valid": signed(nbf=now + 600, exp=now + 900),
        "issued-in-future": signed(iat=now + 600, exp=now + 900),
        "wrong-audience": signed(aud="another-registry"),
        "wrong-issuer": signed(iss="someone-else"),
        "old-generation": signed(gen=claims["gen"] - 1),
        "garbage": "not.a.jwt",
        "nested-header": f"{nested}.{b64(json.dumps(claims).encode())}.{signature}",
        "nested-claims": f"{b64(json.dumps(header).encode())}.{nested}.{signature}",
    }


ATTACKS = [
    "alg-none",
    "hmac-with-public-key",
    "tampered-claims",
    "re-signed-other-key",
    "unknown-kid",
    "expired",
    "not-yet-valid",
    "issued-in-future",
    "wrong-audience",
    "wrong-issuer",
    "old-generation",
    "garbage",
    "nested-header",
    "nested-claims",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_forged_token_rejected(
    server: ServerProcess, customer: str, genuine: str, attack: str
) -> None:
    """Every forged or invalid token gets 401 with a fresh challenge."""
    forged = attacks(server, genuine, customer)[attack]
    response = httpx.get(
        f"{server.url}/v2/{customer}/app/tags/list",
        headers={"Authorization": f"Bearer {forged}"},
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer realm=")


def test_genuine_token_accepted(
    server: ServerProcess, customer: str, genuine: str
) -> None:
    """The untouched token works, so the rejections above are the forgeries'."""
    response = httpx.get(
        f"{server.url}/v2/{customer}/app/tags/list",
        headers={"Authorization": f"Bearer {genuine}"},
    )
    assert response.status_code == 200


ODD_NAMES = [
    "{other}/app",
    "{own}/../{other}/app",
    "{own}/app/../../{other}/app",
    "{own}/app:pull,push repository:{other}/app",
    "{OTHER}/app",
    "{own}%2F..%2F{other}/app",
    "{other}/app\x00",
    " {other}/app",
    "{other}//app",
    "./{other}/app",
    "{other}/app#x",
    "*",
    "{other}/*",
]


@pytest.mark.parametrize("pattern", ODD_NAMES)
def test_scope_escalation_odd_names(
    server: ServerProcess, customer: str, reader: tuple[str, str], pattern: str
) -> None:
    """No odd repository name in a scope yields access to another customer."""
    other = server.add_customer()
    with admin_client(server) as client:
        push_image(client, f"{other}/app")
    name = pattern.format(own=customer, other=other, OTHER=other.upper())
    token = get_token(server, *reader, f"repository:{name}:pull,push")
    for entry in access_of(token):
        assert not entry["name"].startswith(other), entry
    response = httpx.get(
        f"{server.url}/v2/{other}/app/tags/list", headers=bearer(token)
    )
    assert response.status_code == 404
