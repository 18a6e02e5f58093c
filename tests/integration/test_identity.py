"""Accounts, robots, personal access tokens, grants and revocation, end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from moorage import admin
from moorage.auth.secrets import KEYED_HASH_PREFIX
from moorage.db.audit_store import AuditFilter
from moorage.db.schema import accounts, customers, personal_tokens
from moorage.errors import UnauthorizedError
from moorage.services import Services
from tests.support.audit import wait_for_events
from tests.support.database import create_database, drop_database
from tests.support.identity import (
    add_grant,
    add_robot,
    admin_client,
    bearer,
    end_in_past,
    get_token,
    past,
    push_image,
)
from tests.support.server import ServerProcess, unique

# A password change runs two argon2id computations, which take seconds on a
# loaded test machine; httpx's default 5 s timeout is too short there.
PASSWORD_TIMEOUT = 30


def pull_scope(name: str) -> str:
    return f"repository:{name}:pull"


def tags_status(server: ServerProcess, name: str, headers: dict[str, str]) -> int:
    return httpx.get(f"{server.url}/v2/{name}/tags/list", headers=headers).status_code


@pytest.fixture(scope="module")
def product(server: ServerProcess) -> str:
    """A vendor product repository with one image."""
    name = f"{unique('prod')}/app"
    with admin_client(server) as client:
        push_image(client, name)
    return name


def stored_hash(server: ServerProcess, login: str) -> str:
    async def read(services: Services) -> str:
        async with services.engine.connect() as connection:
            value = await connection.scalar(
                select(accounts.c.secret_hash).where(accounts.c.login == login)
            )
        return str(value)

    return server.run_admin(read)


def test_robot_login_name_and_secret(server: ServerProcess) -> None:
    """A robot logs in as CUSTOMER+NAME with a secret of at least 128 bits."""
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "reader", name="ci")
    assert login == f"{customer}+ci"
    assert len(secret) * 6 >= 128
    response = httpx.get(f"{server.url}/v2/", auth=(login, secret))
    assert response.status_code == 200


def test_robot_secret_stored_as_keyed_hash(server: ServerProcess) -> None:
    """A robot's secret is stored as HMAC-SHA256, never in the clear."""
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "reader")
    stored = stored_hash(server, login)
    assert stored.startswith("hmac-sha256$")
    assert secret not in stored


def test_robot_secret_uses_keyed_hash(server: ServerProcess) -> None:
    """A robot's secret is stored as a keyed fast hash, never run through
    argon2id, so robot logins stay cheap (the benchmark measures how cheap)."""
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "reader")

    async def stored_hash(services: Services) -> str:
        record = await services.identity.find_account(login)
        assert record is not None
        return record.secret_hash

    stored = server.run_admin(stored_hash)
    assert stored.startswith(KEYED_HASH_PREFIX)
    assert "argon2" not in stored
    assert secret not in stored
    assert httpx.get(f"{server.url}/v2/", auth=(login, secret)).is_success


def test_robot_rotation_revokes_old(server: ServerProcess) -> None:
    """Rotating a robot's secret rejects the old secret and its tokens at once."""
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "reader", name="ci")
    name = f"{customer}/app"
    token = get_token(server, login, secret, pull_scope(name))
    assert tags_status(server, name, bearer(token)) == 404
    created = server.run_admin(lambda s: admin.rotate_robot(s.identity, customer, "ci"))
    assert created.password is not None
    assert tags_status(server, name, bearer(token)) == 401
    assert httpx.get(f"{server.url}/v2/", auth=(login, secret)).status_code == 401
    assert httpx.get(f"{server.url}/v2/", auth=(login, created.password)).is_success


def test_robot_expired_secret(server: ServerProcess) -> None:
    """A robot whose secret expired cannot log in."""
    customer = server.add_customer()
    created = server.run_admin(
        lambda s: admin.add_robot(s.identity, customer, "old", "reader")
    )
    assert created.password is not None
    end_in_past(server, accounts, "expires_at", login=created.login)
    response = httpx.get(f"{server.url}/v2/", auth=(created.login, created.password))
    assert response.status_code == 401


def test_robot_disable_enable_remove(server: ServerProcess) -> None:
    """A disabled robot is rejected, enabled works again, removed is gone."""
    customer = server.add_customer()
    login, secret = add_robot(server, customer, "reader", name="ci")

    def set_enabled(enabled: bool) -> None:
        server.run_admin(
            lambda s: admin.set_enabled(s.identity, customer, login, "robot", enabled)
        )

    set_enabled(False)
    assert httpx.get(f"{server.url}/v2/", auth=(login, secret)).status_code == 401
    set_enabled(True)
    assert httpx.get(f"{server.url}/v2/", auth=(login, secret)).status_code == 200
    server.run_admin(lambda s: admin.remove_robot(s.identity, customer, "ci"))
    assert httpx.get(f"{server.url}/v2/", auth=(login, secret)).status_code == 401


def test_user_disable_revokes_tokens(server: ServerProcess) -> None:
    """Disabling a user rejects its token on the next request, and enabling it
    again does not revive that token."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    name = f"{customer}/app"
    token = get_token(server, login, password, pull_scope(name))
    assert tags_status(server, name, bearer(token)) == 404

    def set_enabled(enabled: bool) -> None:
        server.run_admin(
            lambda s: admin.set_enabled(s.identity, customer, login, "user", enabled)
        )

    set_enabled(False)
    assert tags_status(server, name, bearer(token)) == 401
    set_enabled(True)
    assert tags_status(server, name, bearer(token)) == 401
    fresh = get_token(server, login, password, pull_scope(name))
    assert tags_status(server, name, bearer(fresh)) == 404


def test_customer_suspend_and_resume(server: ServerProcess) -> None:
    """Suspending a customer stops its tokens and logins; resuming allows logins."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    token = get_token(server, login, password)
    headers = bearer(token)
    assert httpx.get(f"{server.url}/v2/", headers=headers).status_code == 200
    server.run_admin(lambda s: admin.set_customer_active(s.identity, customer, False))
    assert httpx.get(f"{server.url}/v2/", headers=headers).status_code == 401
    assert httpx.get(f"{server.url}/v2/", auth=(login, password)).status_code == 401
    server.run_admin(lambda s: admin.set_customer_active(s.identity, customer, True))
    assert httpx.get(f"{server.url}/v2/", auth=(login, password)).status_code == 200


def test_access_until_ends_logins(server: ServerProcess) -> None:
    """After a customer's access_until nothing of it authenticates."""
    slug = unique("ended")
    server.run_admin(lambda s: admin.add_customer(s.identity, slug, slug, None))
    end_in_past(server, customers, "access_until", slug=slug)
    login, password = server.add_user(slug, "reader")
    assert httpx.get(f"{server.url}/v2/", auth=(login, password)).status_code == 401


def test_grant_gives_and_removal_revokes(server: ServerProcess, product: str) -> None:
    """A customer-wide grant opens a product; removing it closes it on the next
    request, with the same bearer token."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    grant_id = add_grant(server, customer, product.split("/")[0], "reader")
    token = get_token(server, login, password, pull_scope(product))
    assert tags_status(server, product, bearer(token)) == 200
    server.run_admin(lambda s: admin.remove_grant(s.identity, customer, grant_id))
    assert tags_status(server, product, bearer(token)) == 404


def test_grant_until_in_future(server: ServerProcess, product: str) -> None:
    """A grant with an end date in the future is in force."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    until = datetime.now(UTC) + timedelta(days=30)
    add_grant(server, customer, product, "reader", until=until)
    response = httpx.get(f"{server.url}/v2/{product}/tags/list", auth=(login, password))
    assert response.status_code == 200


def test_grant_to_one_account(server: ServerProcess, product: str) -> None:
    """A grant to one account does not reach the customer's other accounts."""
    customer = server.add_customer()
    robot, secret = add_robot(server, customer, "reader")
    login, password = server.add_user(customer, "reader")
    add_grant(server, customer, product, "reader", account=robot)
    assert httpx.get(
        f"{server.url}/v2/{product}/tags/list", auth=(robot, secret)
    ).is_success
    response = httpx.get(f"{server.url}/v2/{product}/tags/list", auth=(login, password))
    assert response.status_code == 404


@pytest.mark.parametrize(
    "pattern", ["products/app:1", "Products/*", "a b", "", "/x", "a//b"]
)
def test_grant_pattern_rejected(server: ServerProcess, pattern: str) -> None:
    """Malformed grant patterns are rejected."""
    customer = server.add_customer()
    with pytest.raises(admin.InvalidInputError):
        add_grant(server, customer, pattern, "reader")


def personal_token(
    server: ServerProcess, customer: str, login: str, role: str
) -> admin.CreatedToken:
    until = datetime.now(UTC) + timedelta(days=1)
    return server.run_admin(
        lambda s: admin.add_personal_token(
            s.identity, customer, login, "ci", role, until
        )
    )


def test_personal_token_capped_role(server: ServerProcess) -> None:
    """A reader token of a writer user may pull but not push."""
    customer = server.add_customer()
    login, _ = server.add_user(customer, "writer")
    name = f"{customer}/app"
    created = personal_token(server, customer, login, "reader")
    token = get_token(server, login, created.token, f"repository:{name}:pull,push")
    assert token["scope"] == f"repository:{name}:pull"
    with httpx.Client(base_url=server.url, auth=(login, created.token)) as client:
        assert client.post(f"/v2/{name}/blobs/uploads/").status_code == 403
        assert client.get(f"/v2/{name}/tags/list").status_code == 404


def test_personal_token_stored_hashed(server: ServerProcess) -> None:
    """A personal access token is stored as a keyed hash."""
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    created = personal_token(server, customer, login, "reader")

    async def read(services: Services) -> str:
        async with services.engine.connect() as connection:
            value = await connection.scalar(
                select(personal_tokens.c.secret_hash).where(
                    personal_tokens.c.id == created.id
                )
            )
        return str(value)

    stored = server.run_admin(read)
    assert stored.startswith("hmac-sha256$")
    # moorage_pat_<id>_<secret>; the secret itself may contain "_".
    secret = created.token.removeprefix("moorage_pat_").partition("_")[2]
    assert len(secret) > 16
    assert secret not in stored


def test_personal_token_revocation(server: ServerProcess) -> None:
    """Revoking a personal access token rejects it and its bearer tokens now."""
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    created = personal_token(server, customer, login, "reader")
    token = get_token(server, login, created.token)
    assert httpx.get(f"{server.url}/v2/", headers=bearer(token)).status_code == 200
    server.run_admin(
        lambda s: admin.revoke_personal_token(s.identity, customer, login, created.id)
    )
    assert httpx.get(f"{server.url}/v2/", headers=bearer(token)).status_code == 401
    response = httpx.get(f"{server.url}/v2/", auth=(login, created.token))
    assert response.status_code == 401


def test_personal_token_of_other_user(server: ServerProcess) -> None:
    """A personal access token works only with its own user's login name."""
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    other, _ = server.add_user(customer, "reader")
    created = personal_token(server, customer, login, "reader")
    response = httpx.get(f"{server.url}/v2/", auth=(other, created.token))
    assert response.status_code == 401


def test_password_change(server: ServerProcess) -> None:
    """A user sets a new password; the old one and older tokens stop working."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    token = get_token(server, login, password)
    new = "correct horse battery staple"
    response = httpx.put(
        f"{server.url}/account/password",
        timeout=PASSWORD_TIMEOUT,
        json={"password": new},
        auth=(login, password),
    )
    assert response.status_code == 204
    assert httpx.get(f"{server.url}/v2/", auth=(login, password)).status_code == 401
    assert httpx.get(f"{server.url}/v2/", auth=(login, new)).status_code == 200
    assert httpx.get(f"{server.url}/v2/", headers=bearer(token)).status_code == 401


@pytest.mark.parametrize("weak", ["short-1", "aaaaaaaaaaaaaaaa", "x" * 300])
def test_password_policy(server: ServerProcess, weak: str) -> None:
    """A password that breaks the policy is rejected with 400."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    response = httpx.put(
        f"{server.url}/account/password",
        timeout=PASSWORD_TIMEOUT,
        json={"password": weak},
        auth=(login, password),
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "INVALID_INPUT"


def test_password_body_nested_too_deeply(server: ServerProcess) -> None:
    """A body nested past json.loads' recursion limit gets 400, not 500."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    response = httpx.put(
        f"{server.url}/account/password",
        timeout=PASSWORD_TIMEOUT,
        content=b"[" * 2000 + b"]" * 2000,
        headers={"Content-Type": "application/json"},
        auth=(login, password),
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "INVALID_INPUT"


def test_password_change_needs_password(server: ServerProcess) -> None:
    """A personal access token cannot change its user's password."""
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    created = personal_token(server, customer, login, "reader")
    response = httpx.put(
        f"{server.url}/account/password",
        timeout=PASSWORD_TIMEOUT,
        json={"password": "correct horse battery staple"},
        auth=(login, created.token),
    )
    assert response.status_code == 401


def test_unknown_account_same_time(server: ServerProcess) -> None:
    """A failed login costs about as much for an unknown name as for a known one.

    CPU time of this process is compared, not wall-clock time, so that other
    load on the machine does not decide the outcome.
    """
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    stranger = unique("nobody")

    async def cpu_seconds(services: Services) -> dict[str, float]:
        spent: dict[str, float] = {}
        for name in (login, stranger):
            started = time.process_time()
            for index in range(5):
                with pytest.raises(UnauthorizedError):
                    await services.authenticator.login(
                        name, f"wrong-password-{index}", f"192.0.2.{index + 10}"
                    )
            spent[name] = time.process_time() - started
        return spent

    spent = server.run_admin(cpu_seconds)
    assert spent[stranger] > spent[login] * 0.5
    assert spent[login] > spent[stranger] * 0.5


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, so its failed logins throttle nobody else."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    process.start()
    yield process
    process.stop()
    drop_database(process.database_url)


def test_failed_logins_throttled(strict_server: ServerProcess) -> None:
    """After five failures the pair waits (429 with Retry-After), even with the
    right password; another account from the same address still logs in."""
    server = strict_server
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    other, other_password = server.add_user(customer, "reader")
    for index in range(5):
        response = httpx.get(f"{server.url}/v2/", auth=(login, f"guess-{index}"))
        assert response.status_code == 401
    response = httpx.get(f"{server.url}/v2/", auth=(login, password))
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert httpx.get(f"{server.url}/v2/", auth=(other, other_password)).is_success
    assert "login throttled" in server.log()
    time.sleep(int(response.headers["Retry-After"]))
    assert httpx.get(f"{server.url}/v2/", auth=(login, password)).is_success


def test_throttled_login_event_names_customer(strict_server: ServerProcess) -> None:
    """The audit event of a login that the throttle rejects names the account's
    customer, at /v2/ and at /token. A name that no account has gets none."""
    server = strict_server
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    stranger = unique("nobody")
    for name in (login, stranger):
        for index in range(5):
            response = httpx.get(f"{server.url}/v2/", auth=(name, f"guess-{index}"))
            assert response.status_code == 401
        response = httpx.get(f"{server.url}/v2/", auth=(name, password))
        assert response.status_code == 429
    response = httpx.get(
        f"{server.url}/token", params={"service": "moorage"}, auth=(login, password)
    )
    assert response.status_code == 429

    throttled = "too many failed logins; try again later"
    found = wait_for_events(
        server,
        AuditFilter(action="auth.login", outcome="failure"),
        lambda events: sum(item.event.reason == throttled for item in events) >= 3,
    )
    customers_seen: dict[str | None, list[str | None]] = {}
    for item in found:
        if item.event.reason == throttled:
            account = item.event.actor_account
            customers_seen.setdefault(account, []).append(item.event.actor_customer)
    assert customers_seen[login] == [customer, customer]
    assert customers_seen[stranger] == [None]


def test_personal_token_expired(server: ServerProcess) -> None:
    """A personal access token past its expiry cannot log in."""
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    created = server.run_admin(
        lambda s: admin.add_personal_token(
            s.identity, customer, login, "old", "reader", None
        )
    )
    end_in_past(server, personal_tokens, "expires_at", id=created.id)
    response = httpx.get(f"{server.url}/v2/", auth=(login, created.token))
    assert response.status_code == 401


def test_access_until_ends_tokens(server: ServerProcess) -> None:
    """Tokens issued before a customer's access_until stop working once it passes."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    token = get_token(server, login, password)
    assert httpx.get(f"{server.url}/v2/", headers=bearer(token)).status_code == 200

    async def end_contract(services: Services) -> None:
        async with services.engine.begin() as connection:
            await connection.execute(
                update(customers)
                .where(customers.c.slug == customer)
                .values(access_until=past())
            )

    server.run_admin(end_contract)
    assert httpx.get(f"{server.url}/v2/", headers=bearer(token)).status_code == 401
