"""Refresh tokens recorded one by one: listing, revocation of one token, forged
and unknown token ids, and the purge of expired records."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from moorage import admin
from moorage.auth.tokens import open_signing_key
from moorage.db.identity_store import SigningKeyRecord
from moorage.db.refresh_token_store import RefreshTokenRecord
from moorage.db.schema import refresh_tokens
from moorage.services import Services
from tests.support.cli import Cli
from tests.support.identity import add_robot, admin_client, bearer, push_image
from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def customer(server: ServerProcess) -> str:
    """A customer with one image in its namespace."""
    slug = server.add_customer()
    with admin_client(server) as client:
        push_image(client, f"{slug}/app")
    return slug


@pytest.fixture
def cli(server: ServerProcess) -> Cli:
    """The command line on the running server's data directory and database."""
    return Cli(server.data_dir, server.database_url)


def offline_token(
    server: ServerProcess, login: str, secret: str, client_id: str = "test"
) -> str:
    """Log in with GET /token and offline_token=true; return the refresh token."""
    response = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "offline_token": "true", "client_id": client_id},
        auth=(login, secret),
    )
    assert response.status_code == 200, response.text
    return str(response.json()["refresh_token"])


def refresh(server: ServerProcess, token: str, scope: str = "") -> httpx.Response:
    """Exchange a refresh token at POST /token, as docker and podman do."""
    return httpx.post(
        f"{server.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "service": "moorage",
            "client_id": "docker",
            "scope": scope,
        },
    )


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def records_of(server: ServerProcess, customer: str, login: str) -> list[Any]:
    async def action(services: Services) -> list[RefreshTokenRecord]:
        _, records = await admin.list_refresh_tokens(
            services.identity, services.authenticator.refresh_tokens, customer, login
        )
        return records

    return server.run_admin(action)


def test_refresh_token_recorded(server: ServerProcess, customer: str) -> None:
    """Each refresh token issued gets a row with its client, address and expiry."""
    login, secret = add_robot(server, customer, "reader")
    token = offline_token(server, login, secret, client_id="podman")
    records = records_of(server, customer, login)
    assert [record.jti for record in records] == [jti_of(token)]
    record = records[0]
    assert record.client_id == "podman"
    assert record.issued_address == "127.0.0.1"
    assert record.last_used_at is None
    lifetime = record.expires_at - record.issued_at
    assert abs(lifetime - timedelta(days=90)) < timedelta(minutes=1)


def test_refresh_use_recorded(server: ServerProcess, customer: str) -> None:
    """Using a refresh token records when and from where."""
    login, secret = add_robot(server, customer, "reader")
    token = offline_token(server, login, secret)
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert refresh(server, token).status_code == 200
    (record,) = records_of(server, customer, login)
    assert record.last_used_at is not None
    assert record.last_used_at >= before.replace(microsecond=0)
    assert record.last_used_address == "127.0.0.1"


def test_revoked_refresh_token_rejected(
    server: ServerProcess, customer: str, cli: Cli
) -> None:
    """A revoked refresh token gets 401 on its next use; another refresh token
    of the same account keeps working."""
    login, secret = add_robot(server, customer, "reader")
    laptop = offline_token(server, login, secret, client_id="laptop")
    ci = offline_token(server, login, secret, client_id="ci")
    assert refresh(server, laptop).status_code == 200
    assert refresh(server, ci).status_code == 200

    listing = cli.ok("token", "refresh", "list", customer, login)
    assert jti_of(laptop) in listing
    assert jti_of(ci) in listing
    assert laptop not in listing
    cli.ok("token", "refresh", "revoke", customer, login, jti_of(laptop))

    rejected = refresh(server, laptop)
    assert rejected.status_code == 401
    assert "refresh token is revoked" in rejected.text
    scope = f"repository:{customer}/app:pull"
    renewed = refresh(server, ci, scope)
    assert renewed.status_code == 200
    tags = httpx.get(
        f"{server.url}/v2/{customer}/app/tags/list", headers=bearer(renewed.json())
    )
    assert tags.status_code == 200
    states = {
        record.jti: record.revoked_at for record in records_of(server, customer, login)
    }
    assert states[jti_of(laptop)] is not None
    assert states[jti_of(ci)] is None


def test_revoke_all_refresh_tokens(
    server: ServerProcess, customer: str, cli: Cli
) -> None:
    """--all revokes every refresh token of the account; password logins go on."""
    login, secret = server.add_user(customer, "reader")
    tokens = [offline_token(server, login, secret) for _ in range(3)]
    output = cli.ok("token", "refresh", "revoke", customer, login, "--all")
    assert "3 refresh token(s)" in output
    for token in tokens:
        assert refresh(server, token).status_code == 401
    assert offline_token(server, login, secret)


def test_refresh_revoke_needs_one_target(
    server: ServerProcess, customer: str, cli: Cli
) -> None:
    """revoke takes a token id or --all; an unknown id is an error."""
    login, secret = add_robot(server, customer, "reader")
    token = offline_token(server, login, secret)
    assert cli.run("token", "refresh", "revoke", customer, login).returncode == 2
    both = cli.run("token", "refresh", "revoke", customer, login, "x", "--all")
    assert both.returncode == 2
    unknown = cli.run("token", "refresh", "revoke", customer, login, "no-such-id")
    assert unknown.returncode == 1
    assert "no active refresh token" in unknown.stderr
    assert refresh(server, token).status_code == 200


def test_refresh_token_of_other_customer(
    server: ServerProcess, customer: str, cli: Cli
) -> None:
    """An admin naming the wrong customer cannot revoke another's tokens."""
    login, secret = add_robot(server, customer, "reader")
    token = offline_token(server, login, secret)
    other = server.add_customer()
    result = cli.run("token", "refresh", "revoke", other, login, jti_of(token))
    assert result.returncode == 1
    assert refresh(server, token).status_code == 200


def test_refreshed_offline_token_recorded(server: ServerProcess, customer: str) -> None:
    """The refresh grant with access_type=offline issues a new recorded token."""
    login, secret = add_robot(server, customer, "reader")
    first = offline_token(server, login, secret)
    response = httpx.post(
        f"{server.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first,
            "access_type": "offline",
            "client_id": "podman",
        },
    )
    second = str(response.json()["refresh_token"])
    jtis = {record.jti for record in records_of(server, customer, login)}
    assert jtis == {jti_of(first), jti_of(second)}
    assert refresh(server, second).status_code == 200


def signing_key(server: ServerProcess) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """Return the kid and private key the server signs with now."""

    async def newest(services: Services) -> SigningKeyRecord:
        records = await services.identity.active_signing_keys()
        return open_signing_key(records[0], services.tokens.codec)

    record = server.run_admin(newest)
    key = serialization.load_pem_private_key(record.private_key.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return record.kid, key


def resign(server: ServerProcess, token: str, **changes: Any) -> str:
    """Return `token` with its claims changed, signed with the server's key, as
    someone holding a leaked signing key could make it."""
    claims = jwt.decode(token, options={"verify_signature": False})
    claims.update(changes)
    kid, key = signing_key(server)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def test_unrecorded_refresh_token_rejected(
    server: ServerProcess, customer: str
) -> None:
    """A validly signed refresh token with no record (a made-up jti, or one
    issued before tokens were recorded) is rejected."""
    login, secret = add_robot(server, customer, "reader")
    token = offline_token(server, login, secret)
    forged = resign(server, token, jti="made-up-token-id")
    assert refresh(server, forged).status_code == 401
    assert refresh(server, token).status_code == 200


def test_refresh_record_bound_to_account(server: ServerProcess, customer: str) -> None:
    """A record counts only for the account it was issued to: a token that
    names another account with a live jti of the attacker's is rejected."""
    victim, victim_secret = add_robot(server, customer, "reader")
    attacker, attacker_secret = add_robot(server, customer, "reader")
    offline_token(server, victim, victim_secret)
    attacker_token = offline_token(server, attacker, attacker_secret)
    forged = resign(server, attacker_token, sub=victim)
    assert refresh(server, forged).status_code == 401
    assert refresh(server, attacker_token).status_code == 200


def test_robot_with_refresh_tokens_removed(
    server: ServerProcess, customer: str
) -> None:
    """Removing an account deletes its refresh token records with it."""
    login, secret = add_robot(server, customer, "reader", name="gone")
    token = offline_token(server, login, secret)
    server.run_admin(lambda s: admin.remove_robot(s.identity, customer, "gone"))
    assert refresh(server, token).status_code == 401

    async def count(services: Services) -> int:
        async with services.engine.connect() as connection:
            found = await connection.scalar(
                select(func.count())
                .select_from(refresh_tokens)
                .where(refresh_tokens.c.jti == jti_of(token))
            )
        return int(found or 0)

    assert server.run_admin(count) == 0


def test_expired_records_purged(fresh_server: ServerProcess) -> None:
    """The server's periodic purge, which runs at start, deletes the records of
    expired refresh tokens and keeps the others."""
    server = fresh_server
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "reader")
    live = offline_token(server, login, secret)

    async def add_expired(services: Services) -> None:
        account = await services.identity.find_account(login)
        assert account is not None
        now = datetime.now(UTC)
        await services.authenticator.refresh_tokens.add(
            jti="expired-token-id",
            account_id=account.id,
            token_generation=account.token_generation,
            personal_token_id=None,
            client_id="old",
            address=None,
            issued_at=now - timedelta(days=91),
            expires_at=now - timedelta(days=1),
        )

    server.run_admin(add_expired)
    jtis = {record.jti for record in records_of(server, customer, login)}
    assert jtis == {jti_of(live), "expired-token-id"}
    server.restart()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jtis = {record.jti for record in records_of(server, customer, login)}
        if jtis == {jti_of(live)}:
            break
        time.sleep(0.2)
    assert jtis == {jti_of(live)}
    assert refresh(server, live).status_code == 200


def state_of(listing: str, jti: str) -> str:
    """Return the state of the listing row that starts with `jti`: the first
    word of the line below it."""
    lines = listing.splitlines()
    row = next(number for number, line in enumerate(lines) if line.startswith(jti))
    return lines[row + 1].split()[0]


def test_refresh_list_states(server: ServerProcess, customer: str, cli: Cli) -> None:
    """The listing marks each token active, revoked or superseded."""
    login, password = server.add_user(customer, "reader")
    until = datetime.now(UTC) + timedelta(days=1)
    personal = server.run_admin(
        lambda s: admin.add_personal_token(
            s.identity, customer, login, "ci", "reader", until
        )
    )
    active = offline_token(server, login, password)
    revoked = offline_token(server, login, password)
    through_personal = offline_token(server, login, personal.token)
    cli.ok("token", "refresh", "revoke", customer, login, jti_of(revoked))
    server.run_admin(
        lambda s: admin.revoke_personal_token(s.identity, customer, login, personal.id)
    )
    listing = cli.ok("token", "refresh", "list", customer, login)
    assert state_of(listing, jti_of(active)) == "active"
    assert state_of(listing, jti_of(revoked)) == "revoked"
    assert state_of(listing, jti_of(through_personal)) == "superseded"
    assert refresh(server, through_personal).status_code == 401
    assert refresh(server, active).status_code == 200
    server.run_admin(
        lambda s: admin.set_enabled(s.identity, customer, login, "user", False)
    )
    listing = cli.ok("token", "refresh", "list", customer, login)
    assert state_of(listing, jti_of(active)) == "superseded"
    assert refresh(server, active).status_code == 401


def test_refresh_list_empty_message(
    server: ServerProcess, customer: str, cli: Cli
) -> None:
    """An account without refresh tokens gets a note on stderr, not an empty
    table, and exit code 0."""
    login, _ = add_robot(server, customer, "reader")
    result = cli.run("token", "refresh", "list", customer, login)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == f"{login} has no refresh tokens\n"


def refresh_list_at_80_columns(
    server: ServerProcess, customer: str, login: str, *layout: str
) -> str:
    """Return the output of `moorage token refresh list` in an 80-column terminal."""
    command = ["token", "refresh", "list", customer, login, *layout]
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", *command],
        env={**server.environment(), "COLUMNS": "80"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.mark.parametrize("layout", [(), ("--wide",)])
def test_refresh_list_at_80_columns(
    server: ServerProcess, customer: str, layout: tuple[str, ...]
) -> None:
    """At 80 columns both layouts fit the width and keep each token id, short
    client id, time and state whole on one line."""
    login, secret = add_robot(server, customer, "reader")
    token = offline_token(server, login, secret, client_id="laptop")
    assert refresh(server, token).status_code == 200

    output = refresh_list_at_80_columns(server, customer, login, *layout)
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "no table printed"
    assert max(len(line.rstrip()) for line in lines) <= 80
    header = " ".join(lines[:3])
    for word in ("id", "client", "issued", "expires", "last used", "state"):
        assert word in header
    row = next(number for number, line in enumerate(lines) if jti_of(token) in line)
    assert lines[row].startswith(jti_of(token))
    assert "laptop" in lines[row]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert re.search(rf"{today} \d\d:\d\d +{today} \d\d:\d\d$", lines[row])
    assert state_of(output, jti_of(token)) == "active"
    if layout:
        assert "127.0.0.1" in output
