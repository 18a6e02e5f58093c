"""The audit cost benchmark in quick mode, so that it keeps working."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="the benchmark needs wrk")
def test_audit_cost_quick_run(tmp_path: Path) -> None:
    """`python -m bench.audit_cost --quick` measures both servers in each scenario."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.audit_cost", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads((tmp_path / "audit-cost.json").read_text())
    assert set(results["scenarios"]) == {
        "manifest_get",
        "blob_get",
        "layer_get",
        "image_pull",
        "pull_eight",
    }
    for key, figures in results["scenarios"].items():
        assert set(figures["samples"]) == {"audited", "unaudited"}, key
        for runs in figures["samples"].values():
            for sample in runs:
                assert sample["rate"] > 0, key
                # CPU time comes in 10 ms ticks: a few quick sendfile pulls
                # can use less than one.
                assert sample["cpu_seconds_per_unit"] >= 0, key
    for key in ("manifest_get", "blob_get"):
        # Seconds of small requests always use CPU, so their cost has a figure.
        assert results["scenarios"][key]["cpu_cost_percent"] is not None, key
    assert "| manifest_get |" in completed.stdout
