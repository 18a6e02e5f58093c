"""Summarise the samples: medians with min and max, ratios, a table and a chart."""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
# The sample key of Moorage with encryption at rest (bench.servers.ENCRYPTED).
ENCRYPTED = "moorage-encrypted"
# Encrypted pulls should be at least this share of the plaintext figure. The
# target is set for pulls only, so pushes are reported without one.
ENCRYPTED_TARGET = 0.8
ENCRYPTED_TARGET_SCENARIOS = frozenset({"pull_one", "pull_eight"})
# With many repositories and tags loaded, a figure should lose at most 20%.
SCALE_TARGET = 0.8
REGISTRIES = ("moorage", "distribution")
START_MARK = "<!-- results:start -->"
END_MARK = "<!-- results:end -->"


@dataclass
class Summary:
    median: float
    low: float
    high: float
    cpu_per_unit: float
    peak_rss_mib: float
    pss_mib: float
    # 0 for samples recorded before the benchmark sampled PSS during the work.
    peak_pss_mib: float
    extra: dict[str, float]


def summarise(samples: list[dict[str, Any]]) -> Summary:
    values = [s["value"] for s in samples]
    cpu = [s["cpu_seconds"] / s["work"] for s in samples if s["work"]]
    extra_keys = samples[0]["extra"].keys()
    return Summary(
        median=statistics.median(values),
        low=min(values),
        high=max(values),
        cpu_per_unit=statistics.median(cpu) if cpu else 0.0,
        peak_rss_mib=max(s["peak_rss_bytes"] for s in samples) / MIB,
        pss_mib=max(s.get("pss_bytes", 0) for s in samples) / MIB,
        peak_pss_mib=max(s.get("peak_pss_bytes", 0) for s in samples) / MIB,
        extra={
            k: statistics.median(s["extra"][k] for s in samples) for k in extra_keys
        },
    )


def ratio(scenario: dict[str, Any]) -> float | None:
    samples = scenario["samples"]
    if "distribution" not in samples or "moorage" not in samples:
        return None
    ours = summarise(samples["moorage"]).median
    theirs = summarise(samples["distribution"]).median
    return ours / theirs if theirs else None


def encryption_ratio(scenario: dict[str, Any]) -> float | None:
    """Return Moorage's encrypted median over its plaintext median, if measured."""
    samples = scenario["samples"]
    if ENCRYPTED not in samples or "moorage" not in samples:
        return None
    plain = summarise(samples["moorage"]).median
    return summarise(samples[ENCRYPTED]).median / plain if plain else None


def _round_ratios(scenario: dict[str, Any]) -> list[float]:
    """Return encrypted over plaintext within each round, which runs both."""
    pairs = zip(
        scenario["samples"][ENCRYPTED], scenario["samples"]["moorage"], strict=False
    )
    return [e["value"] / p["value"] for e, p in pairs if p["value"]]


def _figure(summary: Summary | None) -> str:
    if summary is None:
        return "n/a"
    return f"{_number(summary.median)} ({_number(summary.low)}-{_number(summary.high)})"


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_markdown(results: dict[str, Any], chart_name: str | None) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    versions = ", ".join(f"{name} {value}" for name, value in meta["versions"].items())
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, "
        f"Python {machine['python']}. Versions: {versions}.",
        "",
        f"Run {meta['started']}, {meta['seconds']} s, command `{meta['command']}`, "
        f"{meta['rounds']} round(s), Moorage with {meta['moorage_workers']} worker "
        f"process(es). Load average before {meta['load_before']}, "
        f"after {meta['load_after']}.",
        "",
        "| scenario | unit | Moorage median (min-max) | distribution median (min-max) "
        "| ratio M/D | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in results["scenarios"]:
        samples = scenario["samples"]
        ours = summarise(samples["moorage"])
        theirs = (
            summarise(samples["distribution"]) if "distribution" in samples else None
        )
        found = ratio(scenario)
        better = (
            "higher is better" if scenario["higher_is_better"] else "lower is better"
        )
        lines.append(
            f"| {scenario['title']} | {scenario['unit']} ({better}) "
            f"| {_figure(ours)} | {_figure(theirs)} "
            f"| {f'{found:.2f}' if found else 'n/a'} | {scenario['target'] or '-'} "
            f"| {_met(scenario['target'], found, ours.median)} |"
        )
    lines += ["", *_latency_table(results), "", *_resource_table(results)]
    encryption = _encryption_table(results)
    if encryption:
        lines += ["", *encryption]
    if "scale" in results:
        lines += ["", *_scale_table(results)]
    if chart_name:
        alt = "Ratios: Moorage/distribution, encrypted/plaintext, loaded/empty"
        lines += ["", f"![{alt}]({chart_name})"]
    return "\n".join(lines) + "\n"


def _met(target: str, found: float | None, ours: float) -> str:
    """Check a target "ratio >= X" or "N req/s" (Moorage's median); "-" if none."""
    if target.startswith("ratio >= ") and found is not None:
        return "yes" if found >= float(target.removeprefix("ratio >= ")) else "no"
    if target.endswith(" req/s"):
        wanted = float(target.removesuffix(" req/s").replace(",", ""))
        return "yes" if ours >= wanted else "no"
    return "-"


def _latency_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| scenario | Moorage p50 / p99 ms | distribution p50 / p99 ms |",
        "| --- | --- | --- |",
    ]
    for scenario in results["scenarios"]:
        samples = scenario["samples"]
        if "p99_ms" not in samples["moorage"][0]["extra"]:
            continue
        cells = []
        for name in ("moorage", "distribution"):
            if name not in samples:
                cells.append("n/a")
                continue
            extra = summarise(samples[name]).extra
            cells.append(f"{extra['p50_ms']:.1f} / {extra['p99_ms']:.1f}")
        lines.append(f"| {scenario['title']} | {cells[0]} | {cells[1]} |")
    return lines


def _resource_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| scenario | server CPU s per unit: Moorage / distribution "
        "| peak RSS MiB: Moorage / distribution "
        "| peak PSS MiB: Moorage / distribution | PSS at end MiB: Moorage |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scenario in results["scenarios"]:
        samples = scenario["samples"]
        ours = summarise(samples["moorage"])
        theirs = (
            summarise(samples["distribution"]) if "distribution" in samples else None
        )
        cpu = f"{ours.cpu_per_unit:.2f}"
        rss = f"{ours.peak_rss_mib:.0f}"
        pss = f"{ours.peak_pss_mib:.0f}"
        if theirs is not None:
            cpu += f" / {theirs.cpu_per_unit:.2f}"
            rss += f" / {theirs.peak_rss_mib:.0f}"
            pss += f" / {theirs.peak_pss_mib:.0f}"
        lines.append(
            f"| {scenario['title']} | {cpu} per {scenario['work_unit']} | {rss} "
            f"| {pss} | {ours.pss_mib:.0f} |"
        )
    return lines


def _encryption_table(results: dict[str, Any]) -> list[str]:
    rows = [s for s in results["scenarios"] if encryption_ratio(s) is not None]
    if not rows:
        return []
    lines = [
        "Encryption at rest: Moorage with encryption on against Moorage with it off "
        "(the run above), in the same rounds.",
        "",
        "| scenario | Moorage encrypted median (min-max) "
        "| Moorage plaintext median (min-max) | ratio encrypted/plaintext "
        "(per round) | server CPU s per GiB: encrypted / plaintext | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in rows:
        sealed = summarise(scenario["samples"][ENCRYPTED])
        plain = summarise(scenario["samples"]["moorage"])
        found = encryption_ratio(scenario)
        assert found is not None
        per_round = ", ".join(f"{value:.2f}" for value in _round_ratios(scenario))
        target, met = "-", "-"
        if scenario["key"] in ENCRYPTED_TARGET_SCENARIOS:
            target = f"ratio >= {ENCRYPTED_TARGET}"
            met = "yes" if found >= ENCRYPTED_TARGET else "no"
        lines.append(
            f"| {scenario['title']} | {_figure(sealed)} | {_figure(plain)} "
            f"| {found:.2f} ({per_round}) "
            f"| {sealed.cpu_per_unit:.2f} / {plain.cpu_per_unit:.2f} "
            f"| {target} | {met} |"
        )
    return lines


def scale_ratio(empty: dict[str, Any], loaded: dict[str, Any], name: str) -> float:
    """Return the loaded figure relative to the empty one; 1 means no loss.

    Rates are divided loaded/empty and times empty/loaded, so that below 1 is
    always a loss.
    """
    before = summarise(empty["samples"][name]).median
    after = summarise(loaded["samples"][name]).median
    if not (before and after):
        return 0.0
    return after / before if loaded["higher_is_better"] else before / after


def _scale_rows(
    results: dict[str, Any],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pair each scenario of the data-scale phase with its run before the load."""
    empty = {s["key"]: s for s in results["scenarios"]}
    return [
        (empty[s["key"]], s) for s in results["scale"]["scenarios"] if s["key"] in empty
    ]


def _scale_table(results: dict[str, Any]) -> list[str]:
    scale = results["scale"]
    load = scale["load_seconds"]
    lines = [
        f"Data scale: the scenarios again after loading {scale['repositories']:,} "
        f"repositories of {scale['customers']:,} customers with "
        f"{scale['tags']:,} tags into each registry (Moorage {load['moorage']} s, "
        f'distribution {load["distribution"]} s). "loaded/empty" is the figure '
        "relative to the same registry's before the load, so 1 is no loss and "
        "0.8 is a loss of 20%.",
        "",
        "| scenario | unit | Moorage empty / loaded | loaded/empty "
        "| distribution empty / loaded | loaded/empty | target | met M / D "
        "| server CPU s per unit, empty / loaded: Moorage; distribution |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for empty, loaded in _scale_rows(results):
        cells = []
        met = []
        cpu = []
        for name in REGISTRIES:
            before = summarise(empty["samples"][name])
            after = summarise(loaded["samples"][name])
            found = scale_ratio(empty, loaded, name)
            cells.append(f"{_figure(before)} / {_figure(after)} | {found:.2f}")
            met.append("yes" if found >= SCALE_TARGET else "no")
            cpu.append(f"{before.cpu_per_unit:.2f} / {after.cpu_per_unit:.2f}")
        lines.append(
            f"| {loaded['title']} | {loaded['unit']} | {cells[0]} | {cells[1]} "
            f"| loss <= 20% | {met[0]} / {met[1]} "
            f"| {cpu[0]}; {cpu[1]} per {loaded['work_unit']} |"
        )
    return lines


def write_chart(results: dict[str, Any], path: Path) -> Path | None:
    """Draw the ratios as bars; return None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [
        p
        for p in (
            _distribution_panel(results),
            _encryption_panel(results),
            _scale_panel(results),
        )
        if p.titles
    ]
    if not panels:
        return None
    figure, all_axes = plt.subplots(
        len(panels),
        1,
        figsize=(8, sum(0.45 * len(p.titles) + 1.2 for p in panels)),
        height_ratios=[len(p.titles) + 2 for p in panels],
        squeeze=False,
    )
    for panel, axes in zip(panels, all_axes[:, 0], strict=True):
        colours = [
            "tab:green" if value >= panel.target else "tab:red"
            for value in panel.values
        ]
        axes.barh(panel.titles, panel.values, color=colours)
        axes.axvline(panel.target, color="black", linewidth=0.8)
        axes.invert_yaxis()
        axes.set_xlabel(panel.label)
        for index, value in enumerate(panel.values):
            axes.text(value, index, f" {value:.2f}", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@dataclass
class _Panel:
    """One bar chart: a bar per scenario and the line each bar should reach."""

    label: str
    target: float
    titles: list[str]
    values: list[float]


def _distribution_panel(results: dict[str, Any]) -> _Panel:
    panel = _Panel(
        "Moorage relative to distribution (above 1 = Moorage better)", 1.0, [], []
    )
    for scenario in results["scenarios"]:
        found = ratio(scenario)
        if found is None:
            continue
        # Show every bar as "how many times better", so higher always wins.
        better = found if scenario["higher_is_better"] else 1 / found
        panel.titles.append(scenario["title"])
        panel.values.append(better)
    return panel


def _encryption_panel(results: dict[str, Any]) -> _Panel:
    panel = _Panel(
        f"Moorage encrypted relative to plaintext (target {ENCRYPTED_TARGET})",
        ENCRYPTED_TARGET,
        [],
        [],
    )
    for scenario in results["scenarios"]:
        found = encryption_ratio(scenario)
        if found is not None:
            panel.titles.append(scenario["title"])
            panel.values.append(found)
    return panel


def _scale_panel(results: dict[str, Any]) -> _Panel:
    panel = _Panel(
        f"Loaded relative to empty, same registry (target {SCALE_TARGET})",
        SCALE_TARGET,
        [],
        [],
    )
    if "scale" not in results:
        return panel
    for empty, loaded in _scale_rows(results):
        for name in REGISTRIES:
            panel.titles.append(f"{loaded['title']}, {name}")
            panel.values.append(scale_ratio(empty, loaded, name))
    return panel


def update_docs(page: Path, results: dict[str, Any], chart: Path | None) -> None:
    """Replace the text between the results marks of `page` and copy the chart."""
    chart_name = None
    if chart is not None:
        chart_name = "benchmarks-ratios.png"
        shutil.copyfile(chart, page.parent / chart_name)
    text = page.read_text()
    before, _, rest = text.partition(START_MARK)
    _, _, after = rest.partition(END_MARK)
    body = render_markdown(results, chart_name)
    page.write_text(f"{before}{START_MARK}\n{body}{END_MARK}{after}")
