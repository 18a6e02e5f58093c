"""The failed-login throttle across processes: a server with two workers shares
one budget of free failures, counts concurrent failures exactly, keeps its
counters across a restart, and `moorage login unlock` clears them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from moorage.db.login_failure_store import LoginState
from moorage.services import Services
from tests.support.cli import Cli
from tests.support.identity import add_robot
from tests.support.server import ServerProcess, running_server

# Enough for any test here, so that only the pair and account counters apply:
# every request comes from 127.0.0.1. The tests log in as robots, whose secret
# checks take microseconds, where a user's argon2id check takes 50 ms or more.
RELAXED_ADDRESS = {"MOORAGE_LOGIN_FREE_FAILURES_PER_ADDRESS": "100000"}
PAIR_FREE_FAILURES = 5


@pytest.fixture(scope="module")
def workers_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A registry served by two worker processes."""
    data_dir = tmp_path_factory.mktemp("workers") / "data"
    with running_server(
        data_dir, {"MOORAGE_WORKERS": "2", **RELAXED_ADDRESS}
    ) as server:
        yield server


def failed_logins(client: httpx.Client) -> float:
    """Return the failed-login count of the worker that serves `client`'s
    connection (each worker process has its own metrics)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("moorage_failed_logins_total "):
            return float(line.split()[1])
    raise AssertionError("moorage_failed_logins_total missing from /metrics")


def one_connection(server: ServerProcess) -> httpx.Client:
    """A client that keeps a single connection, so one worker serves it."""
    return httpx.Client(
        base_url=server.url, limits=httpx.Limits(max_connections=1), timeout=60
    )


def client_on_other_worker(server: ServerProcess, seen: float) -> httpx.Client:
    """Return a client whose worker counted no failed login, while the first
    worker counted `seen` (> 0). The kernel picks the worker per connection."""
    for _ in range(100):
        client = one_connection(server)
        if failed_logins(client) != seen:
            return client
        client.close()
    raise AssertionError("every new connection went to the same worker")


def throttle_state(server: ServerProcess, login: str) -> LoginState:
    async def read(services: Services) -> LoginState:
        return await services.authenticator.throttle.store.read(login, "127.0.0.1")

    return server.run_admin(read)


def test_workers_share_free_failures(workers_server: ServerProcess) -> None:
    """Failures counted by one worker use up the budget for the other worker."""
    server = workers_server
    customer = server.add_customer()
    login, password = add_robot(server, customer, "reader")
    with one_connection(server) as first:
        for index in range(3):
            response = first.get("/v2/", auth=(login, f"wrong-{index}"))
            assert response.status_code == 401
        seen = failed_logins(first)
        assert seen >= 3
        second = client_on_other_worker(server, seen)
        try:
            before = failed_logins(second)
            for index in range(PAIR_FREE_FAILURES - 3):
                response = second.get("/v2/", auth=(login, f"other-{index}"))
                assert response.status_code == 401
            assert failed_logins(second) == before + PAIR_FREE_FAILURES - 3
            blocked = second.get("/v2/", auth=(login, password))
            assert blocked.status_code == 429
            assert blocked.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        finally:
            second.close()
        assert first.get("/v2/", auth=(login, password)).status_code == 429
    state = throttle_state(server, login)
    assert state.counters["pair"].failures == PAIR_FREE_FAILURES


def test_concurrent_failures_counted_once(workers_server: ServerProcess) -> None:
    """Wrong passwords sent at once to both workers: every 401 is one failure in
    the shared counter, and every other attempt was throttled."""
    server = workers_server
    customer = server.add_customer()
    login, _ = add_robot(server, customer, "reader")
    attempts = 16

    def attempt(index: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.get("/v2/", auth=(login, f"guess-{index}")).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(attempt, range(attempts)))
    unauthorized = statuses.count(401)
    assert unauthorized + statuses.count(429) == attempts
    assert unauthorized >= PAIR_FREE_FAILURES
    state = throttle_state(server, login)
    assert state.counters["pair"].failures == unauthorized
    assert state.counters["account"].failures == unauthorized


def test_counters_survive_restart(tmp_path: Path) -> None:
    """A restart keeps the counters, so restarting frees no guesses: the first
    failure after it is the sixth, which makes the pair wait."""
    with running_server(tmp_path / "data", RELAXED_ADDRESS) as server:
        customer = server.add_customer()
        login, password = add_robot(server, customer, "reader")
        for index in range(PAIR_FREE_FAILURES):
            response = httpx.get(f"{server.url}/v2/", auth=(login, f"wrong-{index}"))
            assert response.status_code == 401
        server.restart()
        response = httpx.get(f"{server.url}/v2/", auth=(login, "wrong-again"))
        if response.status_code == 429:  # the one-second wait has not ended yet
            time.sleep(int(response.headers["Retry-After"]))
            response = httpx.get(f"{server.url}/v2/", auth=(login, "wrong-again"))
        assert response.status_code == 401
        response = httpx.get(f"{server.url}/v2/", auth=(login, password))
        assert response.status_code == 429


def test_unlock_clears_a_lock(workers_server: ServerProcess) -> None:
    """`moorage login list` shows the counters; `login unlock` ends the wait."""
    server = workers_server
    customer = server.add_customer()
    login, password = add_robot(server, customer, "reader")
    for index in range(PAIR_FREE_FAILURES + 2):
        response = httpx.get(f"{server.url}/v2/", auth=(login, f"wrong-{index}"))
        assert response.status_code in (401, 429)
    assert httpx.get(f"{server.url}/v2/", auth=(login, password)).status_code == 429
    cli = Cli(server.data_dir, server.database_url)
    listing = cli.ok("login", "list")
    assert login in listing
    assert cli.run("login", "unlock").returncode == 2
    output = cli.ok("login", "unlock", login)
    assert "2 failed-login counter(s)" in output
    assert httpx.get(f"{server.url}/v2/", auth=(login, password)).status_code == 200
    assert set(throttle_state(server, login).counters) == {"address"}


def test_hostile_login_names_unauthorized(workers_server: ServerProcess) -> None:
    """Login names with NUL or of any length get 401, and their failures count."""
    server = workers_server
    for login in ("nul\0name", "n" * 5000):
        basic = httpx.get(f"{server.url}/v2/", auth=(login, "guess"))
        assert basic.status_code == 401
        form = httpx.post(
            f"{server.url}/token",
            data={"grant_type": "password", "username": login, "password": "guess"},
        )
        assert form.status_code == 401
        assert throttle_state(server, login).counters["pair"].failures == 2
