"""Built-in alerts: brute force, a shared credential, a revoked credential."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from moorage.audit.events import StoredEvent
from moorage.auth.secrets import hash_password
from moorage.db.audit_store import AuditFilter
from tests.support.audit import wait_for_events
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
    assert wait_until(lambda: _posted(receiver, "unusable_credential", login))
    assert wait_until(lambda: _warned(server, "unusable_credential", login))
