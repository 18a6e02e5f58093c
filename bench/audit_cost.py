"""`python -m bench.audit_cost`: what recording request events costs Moorage.

Two Moorage servers run side by side on loopback: one as shipped, and one with
`MOORAGE_AUDIT_REQUEST_EVENTS=false`, the measurement setting that stops
recording pulls, pushes and logins. wrk sends manifest GETs by tag and blob GETs
(a 16 KiB layer) to each, alternating which goes first, for several rounds. The
cost is reported as the drop in requests/s and the rise in server CPU seconds
per 1,000 requests, each as a percentage of the server without request events.
On a shared machine the CPU figure is the steadier of the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procstat
from bench.load import LoadResult, run_wrk
from bench.runner import load_average, machine
from bench.scenarios import MANIFEST_TYPE, Context, Sizes, setup_small_requests
from bench.servers import MoorageRegistry

AUDITED = "audited"
UNAUDITED = "unaudited"
# The audit writer flushes every 0.5 s by default; waiting this long after the
# load ends puts the last batch's write inside the CPU measurement.
FLUSH_WAIT_SECONDS = 1.5
QUICK_LOAD_SECONDS = 3


@dataclass(frozen=True)
class Sample:
    requests_per_second: float
    cpu_seconds_per_1k: float


def _manifest_get(context: Context, registry: MoorageRegistry) -> LoadResult:
    token = context.token(["repository:bench/small:pull"])
    return run_wrk(
        f"{registry.url}/v2/bench/small/manifests/latest",
        {"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPE},
        connections=context.sizes.connections,
        seconds=context.sizes.load_seconds,
    )


def _blob_get(context: Context, registry: MoorageRegistry) -> LoadResult:
    token = context.token(["repository:bench/small:pull"])
    layer = context.small_manifest["layer"]
    return run_wrk(
        f"{registry.url}/v2/bench/small/blobs/{layer}",
        {"Authorization": f"Bearer {token}"},
        connections=context.sizes.connections,
        seconds=context.sizes.load_seconds,
    )


SCENARIOS: dict[str, Callable[[Context, MoorageRegistry], LoadResult]] = {
    "manifest_get": _manifest_get,
    "blob_get": _blob_get,
}


def _measure(
    run: Callable[[Context, MoorageRegistry], LoadResult],
    context: Context,
    registry: MoorageRegistry,
) -> Sample:
    meter = procstat.UsageMeter(registry.pid)
    meter.start()
    result = run(context, registry)
    time.sleep(FLUSH_WAIT_SECONDS)
    usage = meter.stop()
    if result.requests == 0:
        raise RuntimeError(
            f"wrk completed no request against {registry.name} in "
            f"{context.sizes.load_seconds} s; the machine may be overloaded, so "
            "run again with longer loads (without --quick)"
        )
    return Sample(
        result.requests_per_second, usage.cpu_seconds / (result.requests / 1000)
    )


def _start(root: Path, name: str, workers: int, audited: bool) -> MoorageRegistry:
    registry = MoorageRegistry(name, root / name, workers=workers)
    if not audited:
        registry.environment["MOORAGE_AUDIT_REQUEST_EVENTS"] = "false"
    registry.start()
    return registry


def _cost(samples: dict[str, list[Sample]]) -> dict[str, Any]:
    """Return the medians and the cost of auditing as percentages."""
    rate = {
        name: statistics.median(s.requests_per_second for s in runs)
        for name, runs in samples.items()
    }
    cpu = {
        name: statistics.median(s.cpu_seconds_per_1k for s in runs)
        for name, runs in samples.items()
    }
    return {
        "requests_per_second": rate,
        "cpu_seconds_per_1k_requests": cpu,
        "rate_cost_percent": 100 * (rate[UNAUDITED] - rate[AUDITED]) / rate[UNAUDITED],
        "cpu_cost_percent": 100 * (cpu[AUDITED] - cpu[UNAUDITED]) / cpu[UNAUDITED],
        "samples": {
            name: [vars(sample) for sample in runs] for name, runs in samples.items()
        },
    }


def run(sizes: Sizes, rounds: int, workers: int, log: Any = print) -> dict[str, Any]:
    """Start both servers in a temporary directory, measure, stop, return results."""
    workdir = Path(tempfile.mkdtemp(prefix="moorage-audit-cost-"))
    meta = {
        "machine": machine(),
        "rounds": rounds,
        "moorage_workers": workers,
        "load_seconds": sizes.load_seconds,
        "connections": sizes.connections,
        "load_before": load_average(),
    }
    servers = {
        AUDITED: _start(workdir, AUDITED, workers, audited=True),
        UNAUDITED: _start(workdir, UNAUDITED, workers, audited=False),
    }
    results: dict[str, Any] = {}
    try:
        contexts = {
            name: Context(sizes, f"{server.url}/token", workdir, memoryview(b""), "")
            for name, server in servers.items()
        }
        for name, server in servers.items():
            setup_small_requests(contexts[name], server)
        for key, scenario in SCENARIOS.items():
            samples: dict[str, list[Sample]] = {AUDITED: [], UNAUDITED: []}
            for round_ in range(rounds):
                order = [AUDITED, UNAUDITED]
                if round_ % 2:
                    order.reverse()
                for name in order:
                    sample = _measure(scenario, contexts[name], servers[name])
                    samples[name].append(sample)
                    log(
                        f"{key:13} round {round_ + 1} {name:9} "
                        f"{sample.requests_per_second:9.0f} req/s  "
                        f"{sample.cpu_seconds_per_1k:6.3f} CPU s/1k  "
                        f"load {load_average()}"
                    )
            results[key] = _cost(samples)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_after"] = load_average()
    return {"meta": meta, "scenarios": results}


def render(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | req/s audited | req/s without | cost | "
        "CPU s/1k audited | CPU s/1k without | cost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, figures in results["scenarios"].items():
        rate = figures["requests_per_second"]
        cpu = figures["cpu_seconds_per_1k_requests"]
        lines.append(
            f"| {key} | {rate[AUDITED]:.0f} | {rate[UNAUDITED]:.0f} | "
            f"{figures['rate_cost_percent']:.1f} % | {cpu[AUDITED]:.3f} | "
            f"{cpu[UNAUDITED]:.3f} | {figures['cpu_cost_percent']:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.audit_cost", description=__doc__
    )
    parser.add_argument(
        "--quick", action="store_true", help="3-second loads, 1 round (smoke test)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 5)")
    parser.add_argument(
        "--moorage-workers", type=int, default=2, help="server processes (default 2)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="results directory"
    )
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sizes = Sizes.full()
    if arguments.quick:
        # One second of load can complete no request on a busy 2-core machine.
        sizes = dataclasses.replace(Sizes.quick(), load_seconds=QUICK_LOAD_SECONDS)
    rounds = arguments.rounds or (1 if arguments.quick else 5)
    results = run(sizes, rounds, arguments.moorage_workers)
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "audit-cost.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
