"""The measurement setting that stops recording request events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from moorage.db.audit_store import AuditFilter
from tests.support.audit import audit_events
from tests.support.oci_client import pull_image, push_image, small_image
from tests.support.server import running_server

OFF = {"MOORAGE_AUDIT_REQUEST_EVENTS": "false"}


def test_request_events_off_records_no_pull(tmp_path: Path) -> None:
    """With request events off, pulls leave no event and admin changes still do."""
    with running_server(tmp_path / "data", OFF) as server:
        customer = server.add_customer()
        login, password = server.add_user(customer, "writer")
        with httpx.Client(base_url=server.url, auth=(login, password)) as client:
            push_image(client, f"{customer}/app", "1.0", small_image())
            pull_image(client, f"{customer}/app", "1.0")
        added = subprocess.run(
            [sys.executable, "-m", "moorage", "customer", "add", "globex"],
            env=server.environment(),
            capture_output=True,
            text=True,
            check=False,
        )
        checked = subprocess.run(
            [sys.executable, "-m", "moorage", "config", "check"],
            env=server.environment(),
            capture_output=True,
            text=True,
            check=False,
        )
        server.stop()

        assert added.returncode == 0, added.stderr
        assert audit_events(server, AuditFilter(account=login)) == []
        assert len(audit_events(server, AuditFilter(action="customer.add"))) == 1
        assert "audit_request_events = False" in checked.stdout
        assert "setting for measurements only" in checked.stderr
        assert "request events are not audited" in server.log()
