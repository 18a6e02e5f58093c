"""`/metrics`: Prometheus text that parses, with label sets bounded by customers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from moorage import admin
from moorage.metrics import Metrics
from moorage.services import Services
from tests.support.database import create_database, drop_database
from tests.support.oci_client import pull_image, push_image, small_image
from tests.support.server import ServerProcess

CUSTOMERS = 1000


def _samples(text: str) -> dict[str, list[Sample]]:
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.samples
    return families


def test_metrics_parse_and_count(server: ServerProcess) -> None:
    """Requests, bytes per customer, logins, tokens and stored bytes appear."""
    customer = server.add_customer()
    login, password = server.add_user(customer, "writer")
    image = small_image()
    with httpx.Client(base_url=server.url, auth=(login, password)) as client:
        push_image(client, f"{customer}/app", "1.0", image)
        pulled = pull_image(client, f"{customer}/app", "1.0")
    httpx.get(f"{server.url}/v2/", auth=(login, "wrong-password-xx"))
    httpx.get(f"{server.url}/token", auth=(login, password))

    families = _samples(httpx.get(f"{server.url}/metrics").text)
    requests = families["moorage_http_requests"]
    assert any(
        s.labels == {"route": "get_manifest", "method": "GET", "status": "200"}
        for s in requests
    )
    sent = [
        s for s in families["moorage_http_response_bytes"] if s.name.endswith("_total")
    ]
    mine = [s.value for s in sent if s.labels == {"customer": customer}]
    assert len(mine) == 1
    assert mine[0] >= pulled
    received = [
        s.value
        for s in families["moorage_http_request_bytes"]
        if s.name.endswith("_total") and s.labels == {"customer": customer}
    ]
    assert len(received) == 1
    assert received[0] >= image.layer.size + image.config.size
    assert _value(families, "moorage_failed_logins_total") >= 1
    assert _value(families, "moorage_token_issues_total") >= 1
    stored = [
        s.value
        for s in families["moorage_stored_bytes"]
        if s.labels == {"customer": customer}
    ]
    assert stored == [image.layer.size + image.config.size]
    assert "moorage_audit_queue_depth" in families
    assert "moorage_active_uploads" in families
    buckets = [
        s
        for s in families["moorage_http_request_duration_seconds"]
        if s.name.endswith("_bucket") and s.labels["route"] == "get_manifest"
    ]
    assert buckets


def _value(families: dict[str, list[Sample]], name: str) -> float:
    for samples in families.values():
        for sample in samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not found")


@pytest.fixture
def crowded(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with 1,000 customers, one user each."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    process.start()

    async def populate(services: Services) -> list[tuple[str, str]]:
        created = []
        for index in range(CUSTOMERS):
            slug = f"c{index:04d}"
            await services.identity.create_customer(slug, slug, None)
            if index < 20:
                account = await admin.add_user(
                    services.identity, slug, f"u{index}", "reader"
                )
                assert account.password is not None
                created.append((account.login, account.password))
        return created

    process.users = process.run_admin(populate)  # type: ignore[attr-defined]
    yield process
    process.stop()
    drop_database(process.database_url)


def test_label_sets_bounded_by_customers(crowded: ServerProcess) -> None:
    """With 1,000 customers, series grow with customers only, not with traffic."""
    users: list[tuple[str, str]] = crowded.users  # type: ignore[attr-defined]
    with httpx.Client(base_url=crowded.url) as client:
        for login, password in users:
            for index in range(5):
                response = client.get(
                    f"/v2/c{int(login[1:]):04d}/repo{index}/manifests/tag{index}",
                    auth=(login, password),
                )
                assert response.status_code == 404
    families = _samples(httpx.get(f"{crowded.url}/metrics").text)
    stored = families["moorage_stored_bytes"]
    assert len(stored) == CUSTOMERS
    total = sum(len(samples) for samples in families.values())
    customer_series = len({s.labels.get("customer") for s in stored})
    # Fixed metrics plus one stored-bytes series per customer, plus per-customer
    # byte counters only for customers that moved bytes (none here).
    assert total < CUSTOMERS + 300, total
    assert customer_series == CUSTOMERS
    labels = {key for samples in families.values() for s in samples for key in s.labels}
    assert labels <= {"route", "method", "status", "customer", "kind", "le"}


def test_metrics_token_required(tmp_path: Path) -> None:
    """With metrics_token set, /metrics rejects a request without the token."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    process.extra_env["MOORAGE_METRICS_TOKEN"] = "metrics-secret-value"
    process.start()
    try:
        assert httpx.get(f"{process.url}/metrics").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{process.url}/metrics", headers=wrong).status_code == 401
        right = {"Authorization": "Bearer metrics-secret-value"}
        assert httpx.get(f"{process.url}/metrics", headers=right).status_code == 200
    finally:
        process.stop()
        drop_database(process.database_url)


def test_metrics_without_token_only_for_this_machine(tmp_path: Path) -> None:
    """Without metrics_token, /metrics responds to loopback clients and denies
    the others (here a client behind a trusted proxy)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    process.extra_env["MOORAGE_TRUSTED_PROXIES"] = '["127.0.0.1/32"]'
    process.start()
    try:
        assert httpx.get(f"{process.url}/metrics").status_code == 200
        local = {"X-Forwarded-For": "::1"}
        assert httpx.get(f"{process.url}/metrics", headers=local).status_code == 200
        remote = {"X-Forwarded-For": "203.0.113.5"}
        response = httpx.get(f"{process.url}/metrics", headers=remote)
        assert response.status_code == 403
        assert "metrics_token" in response.text
    finally:
        process.stop()
        drop_database(process.database_url)


def test_sink_drops_counted_once() -> None:
    """Each refresh adds a sink's drops since the previous one to its counter."""
    metrics = Metrics()
    metrics.count_sink_drops({"webhook": 0, "syslog": 3})
    metrics.count_sink_drops({"webhook": 5, "syslog": 3})

    families = _samples(metrics.render().decode())
    counted = {
        sample.labels["sink"]: sample.value
        for sample in families["moorage_audit_sink_dropped"]
        if sample.name == "moorage_audit_sink_dropped_total"
    }
    assert counted == {"webhook": 5.0, "syslog": 3.0}


def test_sink_drops_in_metrics(tmp_path: Path) -> None:
    """A server with an audit webhook reports the webhook's drop count."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process = ServerProcess(data_dir=data_dir, database_url=create_database(data_dir))
    process.extra_env["MOORAGE_AUDIT_WEBHOOK_URL"] = "http://127.0.0.1:9/unreachable"
    process.start()
    try:
        families = _samples(httpx.get(f"{process.url}/metrics").text)
    finally:
        process.stop()
        drop_database(process.database_url)
    counted = [
        (sample.labels, sample.value)
        for sample in families["moorage_audit_sink_dropped"]
        if sample.name == "moorage_audit_sink_dropped_total"
    ]
    assert counted == [({"sink": "webhook"}, 0.0)]
