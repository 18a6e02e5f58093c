"""Built-in alerts: brute force, a shared credential, a revoked credential."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import delete as sa_delete

from moorage import admin
from moorage.audit.events import StoredEvent
from moorage.auth.secrets import hash_password
from moorage.db.audit_store import AuditFilter
from moorage.db.schema import refresh_tokens, utcnow
from tests.support.audit import audit_events, wait_for_events
from tests.support.database import create_database, drop_database
from tests.support.receivers import WebhookReceiver, wait_until
from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def alerting(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, WebhookReceiver]]:
    """A server with low alert thresholds, an alert webhook, and a trusted proxy."""
    data_dir = tmp_path_factory.mktemp("alerts")
    with WebhookReceiver() as receiver:
        process = ServerProcess(
            data_dir=data_dir, database_url=create_database(data_dir)
        )
        process.extra_env.update(
            MOORAGE_ALERT_FAILED_LOGINS="5",
            MOORAGE_ALERT_CREDENTIAL_ADDRESSES="3",
            MOORAGE_ALERT_WEBHOOK_URL=receiver.url,
            MOORAGE_TRUSTED_PROXIES='["127.0.0.1/32"]',
        )
        process.start()
        yield process, receiver
        process.stop()
        drop_database(process.database_url)


def _alerts(server: ServerProcess, kind: str, account: str) -> list[StoredEvent]:
    where = AuditFilter(action=f"alert.{kind}", account=account)
    return wait_for_events(server, where, lambda found: bool(found))


def _posted(receiver: WebhookReceiver, kind: str, account: str) -> bool:
    return any(
        alert["action"] == f"alert.{kind}" and alert["actor_account"] == account
        for body in receiver.bodies
        for alert in body["alerts"]
    )


def _warned(server: ServerProcess, kind: str, account: str) -> bool:
    for line in server.log().splitlines():
        if '"alert"' not in line:
            continue
        record = json.loads(line)
        expected = {"event": "alert", "kind": kind, "subject": account}
        if all(record.get(key) == value for key, value in expected.items()):
            return record.get("level") == "warning"
    return False


def test_failed_login_burst_alerts(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """Five failed logins for one account raise one alert: event, log line, webhook."""
    server, receiver = alerting
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    # Five failures: the registry throttles the pair of login and address after that.
    for attempt in range(5):
        response = httpx.get(
            f"{server.url}/v2/", auth=(login, f"wrong-{attempt}-xxxxx")
        )
        assert response.status_code == 401
    reasons = [item.event.reason for item in _alerts(server, "failed_logins", login)]
    assert (
        reasons.count(f"5 or more failed logins for account {login} within 60 seconds")
        == 1
    )
    assert wait_until(lambda: _posted(receiver, "failed_logins", login))
    assert wait_until(lambda: _warned(server, "failed_logins", login))
    alert = _alerts(server, "failed_logins", login)[0]
    assert alert.event.actor_customer == customer


def test_shared_credential_alerts(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """One login used from four addresses within the hour raises an alert."""
    server, receiver = alerting
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    for index in range(4):
        response = httpx.get(
            f"{server.url}/v2/",
            auth=(login, password),
            headers={"X-Forwarded-For": f"198.51.100.{index + 1}"},
        )
        assert response.status_code == 200
    alerts = _alerts(server, "shared_credential", login)
    assert len(alerts) == 1
    assert wait_until(lambda: _posted(receiver, "shared_credential", login))
    assert wait_until(lambda: _warned(server, "shared_credential", login))


def test_revoked_token_alerts(alerting: tuple[ServerProcess, WebhookReceiver]) -> None:
    """A token used after its account's secret was rotated raises an alert."""
    server, receiver = alerting
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    token = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "scope": f"repository:{customer}/app:pull"},
        auth=(login, password),
    ).json()["token"]

    async def rotate(services):  # type: ignore[no-untyped-def]
        account = await services.identity.find_account(login)
        await services.identity.set_secret(
            account.id, hash_password("new-secret-123456")
        )

    server.run_admin(rotate)
    response = httpx.get(
        f"{server.url}/v2/", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    alerts = _alerts(server, "unusable_credential", login)
    assert len(alerts) == 1
    assert alerts[0].event.actor_customer == customer
    assert wait_until(lambda: _posted(receiver, "unusable_credential", login))
    assert wait_until(lambda: _warned(server, "unusable_credential", login))


def _offline_token(server: ServerProcess, login: str, password: str) -> str:
    """Log in with offline_token=true; return the refresh token."""
    response = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "offline_token": "true", "client_id": "t"},
        auth=(login, password),
    )
    assert response.status_code == 200, response.text
    return str(response.json()["refresh_token"])


def _refresh(server: ServerProcess, refresh_token: str) -> httpx.Response:
    """Exchange a refresh token at POST /token."""
    return httpx.post(
        f"{server.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "service": "moorage",
            "client_id": "t",
        },
    )


def test_revoked_refresh_token_alerts(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """A refresh token used after the admin revoked it raises an alert that
    names its account and customer; the client sees a plain 401."""
    server, receiver = alerting
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    refresh_token = _offline_token(server, login, password)
    server.run_admin(
        lambda s: admin.revoke_refresh_tokens(
            s.identity, s.authenticator.refresh_tokens, customer, login, None
        )
    )
    response = _refresh(server, refresh_token)
    assert response.status_code == 401
    assert customer not in response.text
    assert login not in response.text
    alerts = _alerts(server, "unusable_credential", login)
    assert len(alerts) == 1
    assert alerts[0].event.actor_customer == customer
    assert "refresh token is revoked" in (alerts[0].event.reason or "")
    assert "or unknown" not in (alerts[0].event.reason or "")
    assert wait_until(lambda: _posted(receiver, "unusable_credential", login))


def test_unknown_refresh_token_no_alert(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """A refresh token without a record (issued before tokens were recorded)
    is an ordinary failed use: recorded, but no alert."""
    server, _ = alerting
    customer = server.add_customer()
    login, password = server.add_user(customer, "reader")
    refresh_token = _offline_token(server, login, password)

    async def forget(services):  # type: ignore[no-untyped-def]
        async with services.identity.engine.begin() as connection:
            await connection.execute(sa_delete(refresh_tokens))

    server.run_admin(forget)
    response = _refresh(server, refresh_token)
    assert response.status_code == 401
    where = AuditFilter(action="auth.token", outcome="failure", customer=customer)
    failures = wait_for_events(
        server,
        where,
        lambda found: any(e.event.reason == "refresh token is unknown" for e in found),
    )
    assert any(e.event.reason == "refresh token is unknown" for e in failures)
    alerts = audit_events(server, AuditFilter(action="alert.unusable_credential"))
    assert all(alert.event.actor_customer != customer for alert in alerts)


def _token_request(
    server: ServerProcess, login: str, secret: str, address: str
) -> httpx.Response:
    """Ask the token endpoint for a token with Basic credentials, as a client
    at `address` (through the trusted proxy, so that the tests' failures count
    against different addresses in the login throttle)."""
    return httpx.get(
        f"{server.url}/token",
        params={"service": "moorage"},
        auth=(login, secret),
        headers={"X-Forwarded-For": address},
    )


def _failed_logins(server: ServerProcess, login: str) -> list[StoredEvent]:
    where = AuditFilter(action="auth.login", account=login, outcome="failure")
    return wait_for_events(server, where, lambda found: bool(found))


def _assert_rejected_as_wrong_secret(response: httpx.Response) -> None:
    """The response to a revoked or expired secret equals that to a wrong one."""
    assert response.status_code == 401
    assert response.json()["errors"][0]["message"] == "invalid username or password"


@pytest.mark.parametrize(
    ("expires_in", "revoke", "reason"),
    [
        (None, True, "was revoked"),
        (timedelta(seconds=2), False, "has expired"),
    ],
    ids=["revoked", "expired"],
)
def test_unusable_personal_token_alerts(
    alerting: tuple[ServerProcess, WebhookReceiver],
    expires_in: timedelta | None,
    revoke: bool,
    reason: str,
) -> None:
    """A revoked or expired personal access token with its right secret is
    rejected like a wrong secret, and raises an unusable-credential alert
    with the user's customer."""
    server, receiver = alerting
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    expires_at = None if expires_in is None else utcnow() + expires_in
    token = server.run_admin(
        lambda s: admin.add_personal_token(
            s.identity, customer, login, "ci", "reader", expires_at
        )
    )
    if revoke:
        server.run_admin(
            lambda s: admin.revoke_personal_token(s.identity, customer, login, token.id)
        )
    if expires_at is not None:
        # Tokens cannot be made with an end in the past: wait for this one's.
        time.sleep(max(0.0, (expires_at - utcnow()).total_seconds()) + 0.2)

    response = _token_request(server, login, token.token, "198.51.100.20")
    _assert_rejected_as_wrong_secret(response)

    failures = _failed_logins(server, login)
    assert [item.event.reason for item in failures] == [
        f"personal access token {token.id} (ci) {reason}"
    ]
    assert failures[0].event.actor_customer == customer
    alerts = _alerts(server, "unusable_credential", login)
    assert len(alerts) == 1
    assert alerts[0].event.actor_customer == customer
    assert reason in (alerts[0].event.reason or "")
    assert wait_until(lambda: _posted(receiver, "unusable_credential", login))
    assert wait_until(lambda: _warned(server, "unusable_credential", login))


def test_wrong_personal_token_secret_no_alert(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """A revoked token's id with a wrong secret is an ordinary failed login."""
    server, _ = alerting
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    token = server.run_admin(
        lambda s: admin.add_personal_token(
            s.identity, customer, login, "ci", "reader", None
        )
    )
    server.run_admin(
        lambda s: admin.revoke_personal_token(s.identity, customer, login, token.id)
    )
    guessed = token.token[:-4] + (
        "aaaa" if not token.token.endswith("aaaa") else "bbbb"
    )

    response = _token_request(server, login, guessed, "198.51.100.21")
    _assert_rejected_as_wrong_secret(response)

    failures = _failed_logins(server, login)
    assert [item.event.reason for item in failures] == ["invalid username or password"]
    alerts = audit_events(
        server, AuditFilter(action="alert.unusable_credential", account=login)
    )
    assert alerts == []


def test_rotated_robot_secret_alerts(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """A robot's secret from before its last rotation is rejected like a wrong
    secret and raises an alert. A secret two rotations old is not recognised."""
    server, receiver = alerting
    customer = server.add_customer()
    first = server.run_admin(
        lambda s: admin.add_robot(s.identity, customer, "ci", "reader")
    )
    login = first.login
    assert first.password is not None
    second = server.run_admin(lambda s: admin.rotate_robot(s.identity, customer, "ci"))
    assert second.password is not None

    _assert_rejected_as_wrong_secret(
        _token_request(server, login, first.password, "198.51.100.22")
    )
    assert _token_request(server, login, second.password, "198.51.100.22").is_success

    alerts = _alerts(server, "unusable_credential", login)
    assert len(alerts) == 1
    assert alerts[0].event.actor_customer == customer
    assert "old secret, revoked when the secret was rotated" in (
        alerts[0].event.reason or ""
    )
    assert wait_until(lambda: _posted(receiver, "unusable_credential", login))

    server.run_admin(lambda s: admin.rotate_robot(s.identity, customer, "ci"))
    for secret in (first.password, second.password):
        _assert_rejected_as_wrong_secret(
            _token_request(server, login, secret, "198.51.100.22")
        )
    failures = wait_for_events(
        server,
        AuditFilter(action="auth.login", account=login, outcome="failure"),
        lambda found: len(found) == 3,
    )
    assert [item.event.reason for item in failures] == [
        "old secret, revoked when the secret was rotated",
        "invalid username or password",
        "old secret, revoked when the secret was rotated",
    ]
    assert {item.event.actor_customer for item in failures} == {customer}


def test_disabled_robot_alert_has_customer(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """The alert for a disabled robot's secret carries the robot's customer."""
    server, _ = alerting
    customer = server.add_customer()
    robot = server.run_admin(
        lambda s: admin.add_robot(s.identity, customer, "ci", "reader")
    )
    assert robot.password is not None
    server.run_admin(
        lambda s: admin.set_enabled(s.identity, customer, robot.login, "robot", False)
    )

    response = _token_request(server, robot.login, robot.password, "198.51.100.23")
    assert response.status_code == 401

    alerts = _alerts(server, "unusable_credential", robot.login)
    assert len(alerts) == 1
    assert alerts[0].event.actor_customer == customer
    assert "disabled" in (alerts[0].event.reason or "")


def test_failed_login_customer_hidden_from_client(
    alerting: tuple[ServerProcess, WebhookReceiver],
) -> None:
    """A failed login for a known user records the user's customer, one for an
    unknown name records none, and both get the same response."""
    server, _ = alerting
    customer = server.add_customer()
    login, _ = server.add_user(customer, "reader")
    unknown = f"nobody-{customer}"

    responses = [
        httpx.get(
            f"{server.url}/v2/",
            auth=(name, "wrong-password-xyz"),
            headers={"X-Forwarded-For": "198.51.100.24"},
        )
        for name in (login, unknown)
    ]

    known_response, unknown_response = responses
    assert known_response.status_code == unknown_response.status_code == 401
    assert known_response.content == unknown_response.content
    assert known_response.headers.get(
        "www-authenticate"
    ) == unknown_response.headers.get("www-authenticate")
    assert [item.event.actor_customer for item in _failed_logins(server, login)] == [
        customer
    ]
    assert [item.event.actor_customer for item in _failed_logins(server, unknown)] == [
        None
    ]
