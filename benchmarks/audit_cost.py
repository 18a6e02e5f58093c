"""Measure what auditing costs per request, in process and without a network.

Usage: python benchmarks/audit_cost.py [--requests N]

Prints the time the request path spends in `RequestObserver.observe` (metrics
and queueing one audit event) and the CPU time the background writer spends per
event (hashing and inserting in batches of 1,000) on SQLite in a temporary
directory. Compare the sum with the server's CPU time per request from
`pull_throughput.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from moorage.api.access import Caller
from moorage.api.observe import FinishedRequest, RequestObserver
from moorage.audit.events import AuditEvent
from moorage.auth.access import Principal
from moorage.config import Settings
from moorage.services import Services, open_services


def get_manifest() -> None:
    """Stands in for the route endpoint, whose name the observer reads."""


def _request(index: int, caller: Caller) -> FinishedRequest:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/v2/acme/app/manifests/1.0",
        "headers": [(b"user-agent", b"docker/24.0")],
        "client": ("127.0.0.1", 40000),
        "endpoint": get_manifest,
        "query_string": b"",
    }
    state = {
        "request_id": f"{index:032x}",
        "caller": caller,
        "repository": "acme/app",
        "reference": "1.0",
        "digest": "sha256:" + "a" * 64,
    }
    return FinishedRequest(scope, state, 200, 0.002, 500)


async def observe_cost(services: Services, count: int) -> float:
    """Return microseconds per request spent observing, with the writer idle."""
    principal = Principal(
        account_id=1,
        login="alice",
        kind="user",
        customer_id=1,
        customer_slug="acme",
        role="reader",
        token_generation=0,
        namespaces=("acme",),
        grants=(),
    )
    caller = Caller(principal, None)
    observer = RequestObserver(services)
    audit = services.audit
    audit._queue = asyncio.Queue()  # unbounded, so nothing waits for the writer
    audit._writer = asyncio.create_task(asyncio.sleep(0))  # queue, do not write
    requests = [_request(index, caller) for index in range(count)]
    started = time.perf_counter()
    for finished in requests:
        await observer.observe(finished)
    elapsed = time.perf_counter() - started
    audit._queue = asyncio.Queue()
    audit._writer = None
    return elapsed / count * 1e6


async def writer_cost(services: Services, count: int) -> float:
    """Return CPU microseconds per event for chaining and inserting in batches."""
    events = [
        AuditEvent(
            "manifest.pull",
            actor_account="alice",
            actor_customer="acme",
            repository="acme/app",
            reference="1.0",
            bytes=500,
            request_id=f"{index:032x}",
        )
        for index in range(count)
    ]
    started = time.process_time()
    for first in range(0, count, 1000):
        await services.audit.store.append(events[first : first + 1000])
    return (time.process_time() - started) / count * 1e6


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        services = await open_services(Settings(data_dir=Path(directory)))
        try:
            observed = await observe_cost(services, count)
            written = await writer_cost(services, count)
        finally:
            await services.close()
    print(f"request path (observe and queue): {observed:.1f} us per request")
    print(f"audit writer (hash and insert): {written:.1f} us CPU per event")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().requests))
