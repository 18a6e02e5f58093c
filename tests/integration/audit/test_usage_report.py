"""`moorage usage report`: pulls, pushes and bytes per customer per day."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import httpx

from moorage.db.audit_store import AuditFilter
from tests.support.audit import wait_for_events
from tests.support.oci_client import pull_image, push_image, small_image
from tests.support.server import ServerProcess


def test_usage_report_csv(server: ServerProcess) -> None:
    """One push and two pulls show up as one CSV line for the customer and day."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "writer")
    image = small_image()
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        push_image(client, f"{customer}/app", "1.0", image)
        pulled = pull_image(client, f"{customer}/app", "1.0")
        pulled += pull_image(client, f"{customer}/app", "1.0")
    wait_for_events(
        server,
        AuditFilter(customer=customer, action="blob.pull"),
        lambda found: len(found) == 4,
    )
    completed = subprocess.run(
        [sys.executable, "-m", "moorage", "usage", "report", "--csv"],
        env=server.environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(completed.stdout)))
    mine = [row for row in rows if row["customer"] == customer]
    assert len(mine) == 1
    line = mine[0]
    assert line["pulls"] == "2"
    assert line["blob_downloads"] == "4"
    assert line["pushes"] == "1"
    assert int(line["bytes_out"]) == pulled
    assert int(line["bytes_in"]) == image.layer.size + image.config.size
