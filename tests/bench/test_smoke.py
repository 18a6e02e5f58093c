"""The benchmark suite in quick mode, so that it keeps working."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("docker-registry", "wrk", "ab", "skopeo")


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason=f"the benchmark needs {', '.join(TOOLS)}",
)
def test_bench_quick_run_measures_every_scenario(tmp_path: Path) -> None:
    """`python -m bench --quick` measures every scenario, and again with data."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    keys = {scenario["key"] for scenario in results["scenarios"]}
    assert {"push_monolithic", "pull_eight", "manifest_get", "blob_head"} <= keys
    encrypted = {"push_monolithic", "push_chunked", "pull_one", "pull_eight"}
    for scenario in results["scenarios"]:
        names = {"moorage", "distribution"}
        if scenario["key"].startswith("token"):
            names = {"moorage"}
        if scenario["key"] in encrypted:
            names.add("moorage-encrypted")
        samples = scenario["samples"]
        assert set(samples) == names, scenario["key"]
        for sample in (s for runs in samples.values() for s in runs):
            assert sample["value"] > 0, scenario["key"]
            assert sample["peak_rss_bytes"] > 0, scenario["key"]
            assert sample["peak_pss_bytes"] > 0, scenario["key"]
    loaded = {scenario["key"]: scenario for scenario in results["scale"]["scenarios"]}
    assert set(loaded) == {
        "manifest_get",
        "blob_head",
        "small_images",
        "tag_list",
        "catalog",
    }
    for scenario in loaded.values():
        assert set(scenario["samples"]) == {"moorage", "distribution"}
    # The bench user's catalog on Moorage lists the bench customer's repositories,
    # distribution's lists every repository: after the load, the loaded ones too.
    catalog = next(s for s in results["scenarios"] if s["key"] == "catalog")
    empty = {n: r[0]["extra"]["entries"] for n, r in catalog["samples"].items()}
    full = {
        n: r[0]["extra"]["entries"] for n, r in loaded["catalog"]["samples"].items()
    }
    assert empty["distribution"] == empty["moorage"]
    difference = full["distribution"] - full["moorage"]
    assert difference == results["scale"]["repositories"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| Blob pull, 8 clients |" in markdown
    # The 0.8 target applies to encrypted pulls only, so pushes show no target.
    assert markdown.count("| ratio >= 0.8 |") == 2
    assert "| loss <= 20% |" in markdown
