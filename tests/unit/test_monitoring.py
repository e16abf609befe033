"""The alert rules and the Grafana dashboard in deploy/: they load, the alerts fire on
the series that should raise them (promtool), and they name only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.harness import ROOT

RULES = ROOT / "deploy/prometheus/hapair-rules.yml"
DASHBOARD = ROOT / "deploy/grafana/hapair-site.json"
COLLECTORS = [ROOT / "registry/metrics.py", ROOT / "comm_server/metrics.py"]
PROMTOOL = shutil.which("promtool")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: apt-get install prometheus (make test does)"
)


def defined() -> set[str]:
    """Every series name the collectors produce: gauges as named, counters with
    ``_total``, histograms with their three series."""
    names: set[str] = set()
    for source in COLLECTORS:
        text = source.read_text()
        for kind, name in re.findall(r'(gauge|counter|MetricFamily)\(\s*"(hapair_\w+)"', text):
            if kind == "counter":
                names.add(f"{name}_total")
            elif kind == "MetricFamily":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    return names


def used(expr: str) -> set[str]:
    return set(re.findall(r"\bhapair_\w+", expr))


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_the_collectors_are_read() -> None:
    names = defined()
    assert {"hapair_pair_has_active", "hapair_registry_lookups_total"} <= names
    assert "hapair_comm_poll_lateness_seconds_bucket" in names


@pytest.mark.parametrize("where", ["rules", "dashboard"])
def test_only_metrics_that_exist_are_named(where: str) -> None:
    exprs = rule_exprs() if where == "rules" else dashboard_exprs()
    assert exprs
    unknown = set().union(*(used(e) for e in exprs)) - defined()
    assert not unknown, f"{where} name metrics no daemon serves: {sorted(unknown)}"


def test_every_dashboard_panel_asks_something() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "hapair-site"
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]


@NEEDS_PROMTOOL
def test_the_rules_load() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@NEEDS_PROMTOOL
def test_the_alerts_fire_when_they_should_and_not_before() -> None:
    assert PROMTOOL is not None
    tests = Path(__file__).resolve().parent.parent / "monitoring" / "hapair-rules.test.yml"
    done = subprocess.run(
        [PROMTOOL, "test", "rules", tests.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=tests.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
