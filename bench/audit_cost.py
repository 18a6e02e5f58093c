"""`python -m bench.audit_cost`: what recording request events costs Moorage.

Two Moorage servers run side by side on loopback: one as shipped, and one with
`MOORAGE_AUDIT_REQUEST_EVENTS=false`, the measurement setting that stops
recording pulls, pushes and logins. Each scenario runs against both,
alternating which goes first, for several rounds:

- small requests with wrk: manifest GETs by tag and GETs of a 16 KiB blob,
  where every response is one audit event;
- a 4 MiB layer fetched with wrk, about the size of a real image's layer;
- whole image pulls with wrk: the manifest by tag, the config and five layers
  of 64 KiB to 8 MiB (14.6 MiB in all) fetched in turn on each connection,
  seven audit events per image, as a client pulling an image makes them;
- the main benchmark's pull: 8 clients each pulling the whole benchmark blob
  (1 GiB, or 32 MiB with --quick).

The cost is reported as the drop in throughput and the rise in server CPU
seconds per unit of work (1,000 requests or 1 GiB), each as a percentage of the
server without request events. On a shared machine the CPU figure is the
steadier of the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
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
from bench.scenarios import (
    GIB,
    MANIFEST_TYPE,
    MIB,
    Context,
    Sizes,
    make_blob,
    pull_eight,
    push_image,
    setup_pull,
    setup_small_requests,
)
from bench.servers import MoorageRegistry
from tests.support.images import canonical_json

AUDITED = "audited"
UNAUDITED = "unaudited"
# The audit writer flushes every 0.5 s by default; waiting this long after the
# load ends puts the last batch's write inside the CPU measurement.
FLUSH_WAIT_SECONDS = 1.5
QUICK_LOAD_SECONDS = 3
LAYER_BYTES = 4 * MIB
IMAGE_REPOSITORY = "bench/image"
IMAGE_LAYER_BYTES = (8 * MIB, 4 * MIB, 2 * MIB, 512 * 1024, 64 * 1024)


@dataclass(frozen=True)
class Sample:
    rate: float
    cpu_seconds_per_unit: float


@dataclass(frozen=True)
class Measured:
    """The outcome of one run of a scenario: its throughput and its units of work."""

    rate: float
    units: float


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Context, MoorageRegistry], Measured]
    rate_unit: str
    work_unit: str


def _requests(result: LoadResult, seconds: float) -> Measured:
    if result.requests == 0:
        raise RuntimeError(
            f"wrk completed no request in {seconds} s; the machine may be "
            "overloaded, so run again with longer loads (without --quick)"
        )
    return Measured(result.requests_per_second, result.requests / 1000)


def _manifest_get(context: Context, registry: MoorageRegistry) -> Measured:
    token = context.token(["repository:bench/small:pull"])
    result = run_wrk(
        f"{registry.url}/v2/bench/small/manifests/latest",
        {"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPE},
        connections=context.sizes.connections,
        seconds=context.sizes.load_seconds,
    )
    return _requests(result, context.sizes.load_seconds)


def _blob_get(context: Context, registry: MoorageRegistry) -> Measured:
    token = context.token(["repository:bench/small:pull"])
    layer = context.small_manifest["layer"]
    result = run_wrk(
        f"{registry.url}/v2/bench/small/blobs/{layer}",
        {"Authorization": f"Bearer {token}"},
        connections=context.sizes.connections,
        seconds=context.sizes.load_seconds,
    )
    return _requests(result, context.sizes.load_seconds)


def _layer_get(context: Context, registry: MoorageRegistry) -> Measured:
    token = context.token(["repository:bench/layer:pull"])
    # Fewer connections than the small requests: 64 concurrent 4 MiB bodies
    # measure loopback buffers more than the server.
    result = run_wrk(
        f"{registry.url}/v2/bench/layer/blobs/{context.small_manifest['big_layer']}",
        {"Authorization": f"Bearer {token}"},
        connections=8,
        seconds=context.sizes.load_seconds,
    )
    measured = _requests(result, context.sizes.load_seconds)
    gib = measured.units * 1000 * LAYER_BYTES / GIB
    return Measured(measured.rate * LAYER_BYTES / 1e6, gib)


def _image_pull(context: Context, registry: MoorageRegistry) -> Measured:
    token = context.token([f"repository:{IMAGE_REPOSITORY}:pull"])
    paths = context.small_manifest["image_paths"].split()
    result = run_wrk(
        registry.url,
        {"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPE},
        connections=8,
        seconds=context.sizes.load_seconds,
        paths=paths,
    )
    measured = _requests(result, context.sizes.load_seconds)
    per_request = int(context.small_manifest["image_bytes"]) / len(paths)
    gib = measured.units * 1000 * per_request / GIB
    return Measured(measured.rate * per_request / 1e6, gib)


def _setup_image(context: Context, registry: MoorageRegistry) -> None:
    client = context.client(registry, [IMAGE_REPOSITORY])
    generator = random.Random(3)  # noqa: S311 - test data
    layers = [generator.randbytes(size) for size in IMAGE_LAYER_BYTES]
    config = canonical_json({"architecture": "amd64", "os": "linux", "image": 1})
    push_image(client, IMAGE_REPOSITORY, "1.0", layers, config)
    client.close()
    blobs = [config, *layers]
    prefix = f"/v2/{IMAGE_REPOSITORY}"
    paths = [f"{prefix}/manifests/1.0"] + [
        f"{prefix}/blobs/sha256:{hashlib.sha256(blob).hexdigest()}" for blob in blobs
    ]
    context.small_manifest["image_paths"] = " ".join(paths)
    # The manifest's few hundred bytes are left out of the figure.
    context.small_manifest["image_bytes"] = str(sum(len(blob) for blob in blobs))


def _pull_eight(context: Context, registry: MoorageRegistry) -> Measured:
    outcome = pull_eight(context, registry, 0)
    return Measured(outcome.value, outcome.work)


def _setup_layer(context: Context, registry: MoorageRegistry) -> None:
    client = context.client(registry, ["bench/layer"])
    data = random.Random(2).randbytes(LAYER_BYTES)  # noqa: S311 - test data
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    client.push_blob("bench/layer", digest, memoryview(data))
    client.close()
    context.small_manifest["big_layer"] = digest


SCENARIOS: dict[str, Scenario] = {
    "manifest_get": Scenario(_manifest_get, "req/s", "1k requests"),
    "blob_get": Scenario(_blob_get, "req/s", "1k requests"),
    "layer_get": Scenario(_layer_get, "MB/s", "GiB"),
    "image_pull": Scenario(_image_pull, "MB/s", "GiB"),
    "pull_eight": Scenario(_pull_eight, "MB/s", "GiB"),
}


def _measure(scenario: Scenario, context: Context, registry: MoorageRegistry) -> Sample:
    meter = procstat.UsageMeter(registry.pid)
    meter.start()
    measured = scenario.run(context, registry)
    time.sleep(FLUSH_WAIT_SECONDS)
    usage = meter.stop()
    return Sample(measured.rate, usage.cpu_seconds / measured.units)


def _start(root: Path, name: str, workers: int, audited: bool) -> MoorageRegistry:
    registry = MoorageRegistry(name, root / name, workers=workers)
    if not audited:
        registry.environment["MOORAGE_AUDIT_REQUEST_EVENTS"] = "false"
    registry.start()
    return registry


def _percent(part: float, whole: float) -> float | None:
    """Return `part` as a percentage of `whole`, or None when `whole` is 0.

    CPU time is read in clock ticks of 10 ms, so a quick run of a scenario
    that sends its bodies with sendfile can measure 0 for a server.
    """
    return 100 * part / whole if whole else None


def _cost(samples: dict[str, list[Sample]], scenario: Scenario) -> dict[str, Any]:
    """Return the medians and the cost of auditing as percentages."""
    rate = {
        name: statistics.median(s.rate for s in runs) for name, runs in samples.items()
    }
    cpu = {
        name: statistics.median(s.cpu_seconds_per_unit for s in runs)
        for name, runs in samples.items()
    }
    return {
        "rate_unit": scenario.rate_unit,
        "cpu_unit": f"CPU s per {scenario.work_unit}",
        "rate": rate,
        "cpu_seconds_per_unit": cpu,
        "rate_cost_percent": _percent(rate[UNAUDITED] - rate[AUDITED], rate[UNAUDITED]),
        "cpu_cost_percent": _percent(cpu[AUDITED] - cpu[UNAUDITED], cpu[UNAUDITED]),
        "samples": {
            name: [vars(sample) for sample in runs] for name, runs in samples.items()
        },
    }


def run(
    sizes: Sizes,
    rounds: int,
    workers: int,
    log: Any = print,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Start both servers in a temporary directory, measure, stop, return results.

    `only` names the scenarios to run (default: all); the others are not set up.
    """
    chosen = {key: SCENARIOS[key] for key in only or SCENARIOS}
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
        # Only the pull of eight clients reads the big blob.
        blob_bytes = sizes.blob_bytes if "pull_eight" in chosen else 1
        blob, blob_digest = make_blob(workdir, blob_bytes)
        contexts = {
            name: Context(sizes, f"{server.url}/token", workdir, blob, blob_digest)
            for name, server in servers.items()
        }
        for name, server in servers.items():
            setup_small_requests(contexts[name], server)
            if "layer_get" in chosen:
                _setup_layer(contexts[name], server)
            if "image_pull" in chosen:
                _setup_image(contexts[name], server)
            if "pull_eight" in chosen:
                setup_pull(contexts[name], server)
        for key, scenario in chosen.items():
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
                        f"{sample.rate:9.0f} {scenario.rate_unit:5}  "
                        f"{sample.cpu_seconds_per_unit:6.3f} CPU s per "
                        f"{scenario.work_unit}  load {load_average()}"
                    )
            results[key] = _cost(samples, scenario)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_after"] = load_average()
    return {"meta": meta, "scenarios": results}


def _shown(percent: float | None) -> str:
    return "n/a" if percent is None else f"{percent:.1f} %"


def render(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | unit | audited | without | cost | CPU unit | "
        "CPU audited | CPU without | cost |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, figures in results["scenarios"].items():
        rate = figures["rate"]
        cpu = figures["cpu_seconds_per_unit"]
        lines.append(
            f"| {key} | {figures['rate_unit']} | {rate[AUDITED]:,.0f} | "
            f"{rate[UNAUDITED]:,.0f} | {_shown(figures['rate_cost_percent'])} | "
            f"{figures['cpu_unit']} | {cpu[AUDITED]:.3f} | {cpu[UNAUDITED]:.3f} | "
            f"{_shown(figures['cpu_cost_percent'])} |"
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
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable; default: all)",
    )
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sizes = Sizes.full()
    if arguments.quick:
        # One second of load can complete no request on a busy 2-core machine.
        sizes = dataclasses.replace(Sizes.quick(), load_seconds=QUICK_LOAD_SECONDS)
    rounds = arguments.rounds or (1 if arguments.quick else 5)
    results = run(sizes, rounds, arguments.moorage_workers, only=arguments.only)
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "audit-cost.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
