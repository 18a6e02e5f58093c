"""The shipped Prometheus alerting rules parse and use metrics Moorage serves."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from moorage.metrics import Metrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def _served_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name + "_total")
        names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_rules_file_structure() -> None:
    """Each rule has a name, an expression, a severity and a summary."""
    document = yaml.safe_load(RULES.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_rules_use_served_metrics() -> None:
    """Every moorage_ metric a rule names is one that /metrics serves."""
    served = _served_names()
    used = set(re.findall(r"moorage_[a-z_]+", RULES.read_text()))
    assert used
    assert used <= served, sorted(used - served)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_rules_pass_promtool() -> None:
    """promtool accepts the rules file."""
    completed = subprocess.run(
        ["promtool", "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
