"""Run every scenario against both registries, alternating, for several rounds."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procstat
from bench.dataload import Layout, load_distribution, load_moorage
from bench.load import package_version
from bench.scenarios import (
    SCENARIOS,
    Context,
    Scenario,
    Sizes,
    make_blob,
    prefetch_tokens,
    push_scale_seed,
    warm_up,
)
from bench.servers import (
    ENCRYPTED,
    DistributionRegistry,
    MoorageRegistry,
    Registry,
    distribution_version,
    start_registries,
)
from moorage import __version__


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{memory_kib / 1024 / 1024:.1f}",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    return {
        "moorage": __version__,
        "distribution": distribution_version(),
        "wrk": package_version("wrk"),
        "ab (apache2-utils)": package_version("apache2-utils"),
        "skopeo": package_version("skopeo"),
    }


def _runs_on(scenario: Scenario, registry: Registry) -> bool:
    if registry.name == ENCRYPTED:
        return scenario.encrypted
    return not (scenario.moorage_only and registry.name != "moorage")


def run_scenario(
    scenario: Scenario,
    context: Context,
    registries: list[Registry],
    rounds: int,
    log: Any,
    *,
    first_round: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Run `rounds` rounds; `first_round` > 0 continues an earlier run (no setup)."""
    targets = [r for r in registries if _runs_on(scenario, r)]
    if scenario.setup is not None and first_round == 0:
        for registry in targets:
            scenario.setup(context, registry)
    samples: dict[str, list[dict[str, Any]]] = {r.name: [] for r in targets}
    for round_ in range(first_round, first_round + rounds):
        order = targets if round_ % 2 == 0 else list(reversed(targets))
        for registry in order:
            # Write out what earlier runs left dirty in the page cache (1 GiB
            # per push), so that its writeback does not slow the next run.
            os.sync()
            meter = procstat.UsageMeter(registry.pid)
            meter.start()
            outcome = scenario.run(context, registry, round_)
            usage = meter.stop()
            sample = {
                "value": outcome.value,
                "work": outcome.work,
                "cpu_seconds": usage.cpu_seconds,
                "peak_rss_bytes": usage.peak_rss_bytes,
                "pss_bytes": usage.pss_bytes,
                "peak_pss_bytes": usage.peak_pss_bytes,
                "extra": outcome.extra,
                "load": load_average(),
            }
            samples[registry.name].append(sample)
            log(
                f"{scenario.key:16} round {round_ + 1} {registry.name:17} "
                f"{outcome.value:10.1f} {scenario.unit:8} "
                f"cpu {usage.cpu_seconds:6.2f} s  "
                f"rss {usage.peak_rss_bytes / 2**20:6.1f} MiB  "
                f"pss {usage.peak_pss_bytes / 2**20:6.1f} MiB  load {sample['load']}"
            )
    return samples


def _entry(
    scenario: Scenario, samples: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    return {
        "key": scenario.key,
        "title": scenario.title,
        "unit": scenario.unit,
        "higher_is_better": scenario.higher_is_better,
        "work_unit": scenario.work_unit,
        "target": scenario.target,
        "samples": samples,
    }


def run_scale_phase(
    context: Context,
    registries: list[Registry],
    scenarios: list[Scenario],
    rounds: int,
    log: Any,
) -> dict[str, Any]:
    """Load many repositories and tags into Moorage and distribution, run again.

    The scenarios have run on the same registries without that data just
    before, so each figure compares with the same registry's earlier one.
    """
    moorage = next(r for r in registries if r.name == "moorage")
    distribution = next(r for r in registries if r.name == "distribution")
    assert isinstance(moorage, MoorageRegistry)
    assert isinstance(distribution, DistributionRegistry)
    sizes = context.sizes
    layout = Layout(
        sizes.scale_repositories, sizes.scale_tags_per_repository, sizes.scale_customers
    )
    for registry in (moorage, distribution):
        push_scale_seed(context, registry)
    # Moorage is stopped while its database is loaded, as before a start.
    moorage.stop()
    moorage_seconds = load_moorage(moorage.settings(), layout)
    moorage.launch()
    distribution_seconds = load_distribution(distribution.storage, layout)
    for registry in (moorage, distribution):
        warm_up(context, registry)
    log(
        f"loaded {layout.repositories} repositories with {layout.tags} tags each: "
        f"Moorage {moorage_seconds:.1f} s, distribution {distribution_seconds:.1f} s"
    )
    entries = []
    for scenario in scenarios:
        samples = run_scenario(
            scenario,
            context,
            [moorage, distribution],
            rounds,
            log,
            first_round=rounds,
        )
        entries.append(_entry(scenario, samples))
    return {
        "repositories": layout.repositories,
        "tags": layout.repositories * layout.tags,
        "customers": layout.customers,
        "load_seconds": {
            "moorage": round(moorage_seconds, 1),
            "distribution": round(distribution_seconds, 1),
        },
        "scenarios": entries,
    }


def run(
    sizes: Sizes,
    rounds: int,
    only: list[str] | None,
    command: str,
    moorage_workers: int,
    log: Any = print,
    keep: bool = False,
    scale: bool = False,
) -> dict[str, Any]:
    """Start the registries in a temporary directory, run, stop, return results.

    With `scale`, the scenarios marked for it run again after many repositories
    and tags were loaded (see `run_scale_phase`).
    """
    workdir = Path(tempfile.mkdtemp(prefix="moorage-bench-"))
    started = time.time()
    meta = {
        "command": command,
        "machine": machine(),
        "versions": versions(),
        "sizes": dataclasses.asdict(sizes),
        "rounds": rounds,
        "moorage_workers": moorage_workers,
        "load_before": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "python_executable": sys.executable,
    }
    selected = [s for s in SCENARIOS if not only or s.key in only]
    registries = start_registries(
        workdir, moorage_workers, encrypted=any(s.encrypted for s in selected)
    )
    results: list[dict[str, Any]] = []
    scale_results: dict[str, Any] | None = None
    try:
        blob, digest = make_blob(workdir, sizes.blob_bytes)
        context = Context(sizes, registries[0].token_url, workdir, blob, digest)
        # Logins happen before any measurement: the first one runs argon2id.
        prefetch_tokens(context, registries)
        for scenario in selected:
            samples = run_scenario(scenario, context, registries, rounds, log)
            results.append(_entry(scenario, samples))
        if scale:
            scaled = [s for s in selected if s.scale]
            scale_results = run_scale_phase(context, registries, scaled, rounds, log)
        context.blob.release()
    finally:
        for registry in registries:
            registry.stop()
        if not keep:
            # A --scale run leaves about 230,000 link files in distribution's
            # storage. `rm` deleted 23,000 of them in 85 s on a busy disk,
            # where `shutil.rmtree` took 134 s.
            subprocess.run(["rm", "-rf", "--", str(workdir)], check=False)
    meta["load_after"] = load_average()
    meta["seconds"] = f"{time.time() - started:.0f}"
    output: dict[str, Any] = {"meta": meta, "scenarios": results}
    if scale_results is not None:
        output["scale"] = scale_results
    return output
