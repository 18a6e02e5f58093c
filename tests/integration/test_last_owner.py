"""The admin API keeps an active owner in every customer: demoting, disabling or
deleting the last one gets 409 LAST_OWNER, unless a vendor admin forces it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from moorage.audit.events import StoredEvent
from moorage.db.audit_store import AuditFilter
from tests.support.audit import wait_for_events
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, ServerProcess, unique

# A login runs argon2id, which takes seconds on a loaded test machine.
TIMEOUT = 30


def api(server: ServerProcess, auth: tuple[str, str]) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/api/v1", auth=auth, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def vendor(server: ServerProcess) -> Iterator[httpx.Client]:
    with api(server, (ADMIN_LOGIN, ADMIN_PASSWORD)) as client:
        yield client


def add_user(vendor: httpx.Client, customer: str, role: str) -> tuple[str, str]:
    login = unique("user")
    response = vendor.post(
        f"/customers/{customer}/users", json={"login": login, "role": role}
    )
    assert response.status_code == 201, response.text
    return login, response.json()["password"]


def assert_last_owner(response: httpx.Response, login: str, customer: str) -> None:
    assert response.status_code == 409, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "LAST_OWNER"
    assert (
        f"'{login}' is the last active owner of customer '{customer}'"
        in (error["message"])
    )


# Each change: its method, its path under the user, and its body.
CHANGES: dict[str, tuple[str, str, dict[str, str] | None]] = {
    "demote": ("PUT", "/role", {"role": "maintainer"}),
    "disable": ("POST", "/disable", None),
    "delete": ("DELETE", "", None),
}


def change_user(
    client: httpx.Client, change: str, customer: str, login: str, force: bool = False
) -> httpx.Response:
    method, path, body = CHANGES[change]
    return client.request(
        method,
        f"/customers/{customer}/users/{login}{path}",
        json=body,
        params={"force": "true"} if force else None,
    )


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_last_owner_change_rejected(
    server: ServerProcess, vendor: httpx.Client, change: str
) -> None:
    """The only owner cannot demote, disable or delete itself; nothing changes."""
    customer = server.add_customer()
    login, password = add_user(vendor, customer, "owner")
    with api(server, (login, password)) as owner:
        assert_last_owner(change_user(owner, change, customer, login), login, customer)

        account = owner.get(f"/customers/{customer}/users/{login}")
        assert account.status_code == 200, account.text
        assert account.json()["role"] == "owner"
        assert account.json()["disabled"] is False


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_vendor_needs_force(
    server: ServerProcess, vendor: httpx.Client, change: str
) -> None:
    """A vendor admin gets 409 too, and makes the change with force=true."""
    customer = server.add_customer()
    login, _ = add_user(vendor, customer, "owner")
    assert_last_owner(change_user(vendor, change, customer, login), login, customer)

    forced = change_user(vendor, change, customer, login, force=True)
    assert forced.status_code in (200, 204), forced.text


def test_forced_change_audited(server: ServerProcess, vendor: httpx.Client) -> None:
    """The audit event of a forced change marks it as forced."""
    customer = server.add_customer()
    login, _ = add_user(vendor, customer, "owner")
    response = vendor.post(
        f"/customers/{customer}/users/{login}/disable", params={"force": "true"}
    )
    assert response.status_code == 204, response.text

    request_id = response.headers["X-Request-Id"]

    def of_request(events: list[StoredEvent]) -> list[StoredEvent]:
        return [stored for stored in events if stored.event.request_id == request_id]

    events = wait_for_events(
        server,
        AuditFilter(action="user.disable"),
        lambda events: bool(of_request(events)),
    )
    reasons = [stored.event.reason for stored in of_request(events)]
    assert reasons == [f"user {login} of {customer} (forced)"]


def test_owner_cannot_force(server: ServerProcess, vendor: httpx.Client) -> None:
    """force=true from a customer's owner is denied, and nothing changes."""
    customer = server.add_customer()
    login, password = add_user(vendor, customer, "owner")
    with api(server, (login, password)) as owner:
        response = owner.post(
            f"/customers/{customer}/users/{login}/disable", params={"force": "true"}
        )
        assert response.status_code == 403, response.text
        assert response.json()["errors"][0]["code"] == "DENIED"
        account = owner.get(f"/customers/{customer}/users/{login}")
        assert account.json()["disabled"] is False


def test_second_owner_allows_change(
    server: ServerProcess, vendor: httpx.Client
) -> None:
    """With two owners one may step down, and then the other is the last one."""
    customer = server.add_customer()
    first, first_password = add_user(vendor, customer, "owner")
    second, _ = add_user(vendor, customer, "owner")
    with api(server, (first, first_password)) as owner:
        stepped_down = change_user(owner, "demote", customer, first)
        assert stepped_down.status_code == 200, stepped_down.text
    assert_last_owner(change_user(vendor, "demote", customer, second), second, customer)


def test_disabled_owner_not_counted(
    server: ServerProcess, vendor: httpx.Client
) -> None:
    """A disabled owner cannot log in, so it does not keep the customer managed."""
    customer = server.add_customer()
    active, _ = add_user(vendor, customer, "owner")
    inactive, _ = add_user(vendor, customer, "owner")
    disabled = change_user(vendor, "disable", customer, inactive)
    assert disabled.status_code == 204, disabled.text

    assert_last_owner(change_user(vendor, "delete", customer, active), active, customer)
    # Changing the disabled owner leaves the active one, so it is allowed.
    removed = change_user(vendor, "delete", customer, inactive)
    assert removed.status_code == 204, removed.text


def test_robot_owner_counted(server: ServerProcess, vendor: httpx.Client) -> None:
    """An owner robot manages its customer too, and can be the last owner."""
    customer = server.add_customer()
    login, _ = add_user(vendor, customer, "owner")
    robot = vendor.post(
        f"/customers/{customer}/robots", json={"name": "ops", "role": "owner"}
    )
    assert robot.status_code == 201, robot.text

    demoted = change_user(vendor, "demote", customer, login)
    assert demoted.status_code == 200, demoted.text
    for response in (
        vendor.put(f"/customers/{customer}/robots/ops/role", json={"role": "reader"}),
        vendor.post(f"/customers/{customer}/robots/ops/disable"),
        vendor.delete(f"/customers/{customer}/robots/ops"),
    ):
        assert_last_owner(response, f"{customer}+ops", customer)


def test_owners_demoting_each_other(
    server: ServerProcess, vendor: httpx.Client
) -> None:
    """Two owners demote each other at once: one wins, the other is rejected."""
    customer = server.add_customer()
    first = add_user(vendor, customer, "owner")
    second = add_user(vendor, customer, "owner")

    def demote(caller: tuple[str, str], target: str) -> int:
        with api(server, caller) as client:
            return change_user(client, "demote", customer, target).status_code

    with ThreadPoolExecutor(2) as pool:
        results = [
            pool.submit(demote, first, second[0]),
            pool.submit(demote, second, first[0]),
        ]
        statuses = sorted(result.result() for result in results)

    # The loser gets 403 instead when the winner demoted it before its request
    # was authorised. It must never succeed.
    assert statuses[0] == 200
    assert statuses[1] in (403, 409)
    users = vendor.get(f"/customers/{customer}/users").json()
    owners = [user["login"] for user in users if user["role"] == "owner"]
    assert len(owners) == 1
