"""What the audit trail keeps when the server stops: everything on SIGTERM, all
but the documented window on SIGKILL."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moorage.audit.events import AUDIT_IMPORT
from moorage.audit.log import PENDING_DIRECTORY
from moorage.db.audit_store import AuditFilter
from tests.support.audit import audit_events, reject_audit_events
from tests.support.database import create_database, drop_database
from tests.support.oci_client import push_image, small_image
from tests.support.server import ServerProcess

FLUSH_SECONDS = 0.5
# Time for one audit write on a loaded test machine, on top of the interval.
WRITE_MARGIN_SECONDS = 1.0


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[type[ServerProcess]]:
    started: list[ServerProcess] = []

    def make(flush_seconds: float, shutdown_seconds: float = 30) -> ServerProcess:
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        process = ServerProcess(
            data_dir=data_dir, database_url=create_database(data_dir)
        )
        process.extra_env["MOORAGE_AUDIT_FLUSH_SECONDS"] = str(flush_seconds)
        process.extra_env["MOORAGE_AUDIT_SHUTDOWN_SECONDS"] = str(shutdown_seconds)
        process.start()
        started.append(process)
        return process

    yield make  # type: ignore[misc]
    for process in started:
        process.stop()
        drop_database(process.database_url)


def _prepare(server: ServerProcess) -> tuple[str, str, str]:
    customer = server.add_customer()
    login, password = server.add_user(customer, "writer")
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        push_image(client, f"{customer}/app", "1.0", small_image())
    return customer, login, password


def _pulls(server: ServerProcess, login: str) -> list[object]:
    where = AuditFilter(account=login, action="manifest.pull")
    return list(audit_events(server, where))


def test_sigterm_loses_no_events(make_server) -> None:  # type: ignore[no-untyped-def]
    """Events still queued at SIGTERM are written before the process exits."""
    server = make_server(flush_seconds=5)
    customer, login, password = _prepare(server)
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        for _ in range(300):
            response = client.get(f"/v2/{customer}/app/manifests/1.0")
            assert response.status_code == 200
    server.stop(signal.SIGTERM)
    assert "audit log closed" in server.log()
    assert len(_pulls(server, login)) == 300


def test_sigkill_loses_at_most_window(make_server) -> None:  # type: ignore[no-untyped-def]
    """A SIGKILL during a stream of pulls loses only the pulls of the last window."""
    server = make_server(flush_seconds=FLUSH_SECONDS)
    customer, login, password = _prepare(server)
    finished: list[float] = []
    stop = threading.Event()

    def pull_forever() -> None:
        with httpx.Client(base_url=server.url, auth=(login, password)) as client:
            while not stop.is_set():
                try:
                    response = client.get(f"/v2/{customer}/app/manifests/1.0")
                except httpx.TransportError:
                    return
                if response.status_code == 200:
                    finished.append(time.monotonic())

    workers = [threading.Thread(target=pull_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(3)
    killed_at = time.monotonic()
    server.stop(signal.SIGKILL)
    stop.set()
    for worker in workers:
        worker.join()

    recorded = len(_pulls(server, login))
    completed = len(finished)
    window = FLUSH_SECONDS + WRITE_MARGIN_SECONDS
    in_window = sum(1 for at in finished if at >= killed_at - window)
    assert completed > 100, "too few pulls to measure"
    assert recorded <= completed + len(workers)
    assert completed - recorded <= in_window, (completed, recorded, in_window)


def test_sigterm_with_failing_writes_saves_events(make_server) -> None:  # type: ignore[no-untyped-def]
    """While audit writes fail, SIGTERM ends the server after the shutdown
    limit, with the queued events in a file that the next start adds."""
    server = make_server(flush_seconds=5, shutdown_seconds=2)
    customer, login, password = _prepare(server)
    reject_audit_events(server.database_url, "manifest.pull")
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        for _ in range(50):
            response = client.get(f"/v2/{customer}/app/manifests/1.0")
            assert response.status_code == 200

    stopping = time.monotonic()
    server.stop(signal.SIGTERM, timeout=60)
    stopped_after = time.monotonic() - stopping
    assert server.process is not None
    assert server.process.returncode is not None
    # 2 s of retries, then at most one write attempt of up to 5 s.
    assert stopped_after < 15, stopped_after
    saved = sorted((server.data_dir / PENDING_DIRECTORY).glob("*.jsonl"))
    assert len(saved) == 1
    lines = saved[0].read_text().splitlines()
    assert sum('"action": "manifest.pull"' in line for line in lines) == 50
    assert "audit events saved to a file" in server.log()

    reject_audit_events(server.database_url, "none")
    server.start()
    assert len(_pulls(server, login)) == 50
    imports = audit_events(server, AuditFilter(action=AUDIT_IMPORT))
    assert len(imports) == 1
    assert saved[0].name in (imports[0].event.reason or "")
    assert not saved[0].exists()
    verified = server.run_admin(lambda services: services.audit.verify())
    assert verified.ok, verified.problem
