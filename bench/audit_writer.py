"""`python -m bench.audit_writer`: CPU microseconds per request audit event.

Runs in one process against a fresh SQLite data directory, or against the
PostgreSQL database in `--database-url`, without a server or a client:

- request side: `RequestObserver.observe` for a manifest GET by tag, as the
  request middleware calls it, with request events recorded and without; the
  difference is what building, observing and queueing one event costs;
- writer: `AuditStore.append` of batches of such events (fit, hash chain,
  insert, commit), as the audit writer runs it;
- both: the request side queues events and the real writer stores them.

Each phase runs several rounds and reports the median of the process CPU time
(every thread) per event, so other work on the machine counts less than in
wall time. `bench.audit_cost` measures the same cost on a loaded server.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from moorage.api.access import AuthAttempt, Caller
from moorage.api.observe import FinishedRequest, RequestObserver
from moorage.audit.events import MANIFEST_PULL, AuditEvent
from moorage.auth.access import Principal
from moorage.config import Settings
from moorage.services import Services, open_services


def get_manifest() -> None:
    """Stands in for the manifest GET endpoint, which the observer finds by name."""


def _finished(index: int) -> FinishedRequest:
    """Return a manifest GET by tag as the benchmark's wrk load sends it."""
    principal = Principal(
        account_id=1,
        login="robot$bench+ci",
        kind="robot",
        customer_id=1,
        customer_slug="bench",
        role="reader",
        token_generation=0,
    )
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v2/bench/small/manifests/latest",
        "client": ("127.0.0.1", 40000 + index % 1000),
        "headers": [
            (b"host", b"127.0.0.1:5000"),
            (b"authorization", b"Bearer x"),
            (b"accept", b"application/vnd.oci.image.manifest.v1+json"),
        ],
        "endpoint": get_manifest,
    }
    state = {
        "request_id": f"0123456789abcdef{index:016x}",
        "caller": Caller(principal, None),
        "auth": AuthAttempt("bearer", principal.login, None),
        "repository": "bench/small",
        "reference": "latest",
        "digest": "sha256:" + "ab" * 32,
    }
    return FinishedRequest(scope, state, 200, 0.0002, 1042)


def _event(index: int) -> AuditEvent:
    """Return the event that `_finished(index)` records."""
    return AuditEvent(
        MANIFEST_PULL,
        actor_account="robot$bench+ci",
        actor_customer="bench",
        source_address="127.0.0.1",
        repository="bench/small",
        reference="latest",
        digest="sha256:" + "ab" * 32,
        bytes=1042,
        request_id=f"0123456789abcdef{index:016x}",
    )


async def _cpu_per_event(
    work: Callable[[], Awaitable[None]], events: int, rounds: int
) -> float:
    """Return the median process CPU microseconds per event of `work`."""
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        await work()
        samples.append((time.process_time() - started) / events * 1e6)
    return statistics.median(samples)


async def _request_side(services: Services, events: int, rounds: int) -> float:
    """Return the request side's CPU microseconds per event (see the docstring)."""
    requests = [_finished(index) for index in range(events)]
    unaudited = dataclasses.replace(
        services,
        settings=services.settings.model_copy(update={"audit_request_events": False}),
    )
    with_events = RequestObserver(services)
    without_events = RequestObserver(unaudited)

    async def observe(observer: RequestObserver) -> None:
        for finished in requests:
            await observer.observe(finished)

    async def audited() -> None:
        await observe(with_events)
        # Empty the queue without writing, so the next round has room.
        for _ in services.audit._drain(events):
            services.audit._queue.task_done()

    cost = await _cpu_per_event(audited, events, rounds)
    base = await _cpu_per_event(lambda: observe(without_events), events, rounds)
    return cost - base


async def _writer(services: Services, events: int, rounds: int) -> float:
    batch = [_event(index) for index in range(events)]

    async def append() -> None:
        await services.audit.store.append(batch)

    return await _cpu_per_event(append, events, rounds)


async def _both(services: Services, events: int, rounds: int) -> float:
    requests = [_finished(index) for index in range(events)]
    observer = RequestObserver(services)

    async def observe_and_write() -> None:
        for finished in requests:
            await observer.observe(finished)
        await services.audit._queue.join()

    return await _cpu_per_event(observe_and_write, events, rounds)


async def run(
    settings: Settings, events: int, rounds: int, log: Any = print
) -> dict[str, float]:
    """Measure each phase on the database that `settings` names."""
    settings = settings.model_copy(update={"audit_queue_size": events})
    services = await open_services(settings)
    audit = services.audit
    results: dict[str, float] = {}
    try:
        audit.start()
        results["request_side"] = await _request_side(services, events, rounds)
        log(f"request side  {results['request_side']:6.2f} us CPU per event")
        results["writer"] = await _writer(services, events, rounds)
        log(f"writer        {results['writer']:6.2f} us CPU per event")
        # Write at once instead of every flush interval, to measure CPU only.
        audit.flush_seconds = 0
        results["both"] = await _both(services, events, rounds)
        log(f"both          {results['both']:6.2f} us CPU per event")
    finally:
        await services.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.audit_writer", description=__doc__
    )
    parser.add_argument(
        "--events", type=int, default=2000, help="events per round (default 2000)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL URL, as MOORAGE_DATABASE_URL takes it (default: SQLite)",
    )
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="moorage-audit-writer-") as directory:
        settings = Settings(data_dir=Path(directory), encryption=False)
        if arguments.database_url:
            settings = settings.model_copy(
                update={"database_url": arguments.database_url}
            )
        asyncio.run(run(settings, arguments.events, arguments.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
