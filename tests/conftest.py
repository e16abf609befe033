"""What every test run has: property tests without a time limit, and skips reported loudly
(the fixtures with etcd and agents are in integration/conftest.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

# A time limit per example measures the machine's load, not the code: property tests
# bound their work by the number of examples only.
settings.register_profile("hapair", deadline=None)
settings.load_profile("hapair")


# A skipped test proves nothing. Outside CI a skip is reported loudly at the end; under
# CI=true it fails the run, unless the test is marked ``may_skip`` (a skip that weakens
# no safety claim, e.g. a machine without an IPv6 loopback).
_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_SKIPPED = "hapair_skipped"  # a report's property: it travels from xdist's workers


# Every PostgreSQL cluster the run makes (in a test process or by an agent it starts) is
# a copy of the run's first initdb (HAPAIR_TEST_INITDB_TEMPLATES, workshop_agent/pg/ctl.py):
# made by this process, inherited by xdist's workers, removed at the end.
_TEMPLATES = "HAPAIR_TEST_INITDB_TEMPLATES"
_own_templates: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "may_skip: a skip of this test weakens no safety claim (allowed under CI)"
    )
    config.addinivalue_line("markers", f"long: {LONG_HELP}")
    if _TEMPLATES not in os.environ:
        _own_templates.append(tempfile.mkdtemp(prefix="hapair-initdb-"))
        os.environ[_TEMPLATES] = _own_templates[0]


# A run on two workers ends when the later one does: a test of a minute started last
# keeps the other worker idle for that minute. The tests marked ``long`` (15 s or more
# on a loaded machine) run first, the rest keep their order; xdist's work stealing then
# evens out the short ones at the end.
LONG_HELP = "a test of 15 s or more: run before the others, so that no run ends on one"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_unconfigure(config: pytest.Config) -> None:
    for directory in _own_templates:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else "skipped"
    report.user_properties.append((_SKIPPED, reason))
    if _IN_CI and item.get_closest_marker("may_skip") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which proves nothing: {reason}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        for name, value in getattr(report, "user_properties", ())
        if name == _SKIPPED
    ]
    if not skipped:
        return
    terminalreporter.section("SKIPPED TESTS: these claims were not checked", sep="!", red=True)
    for nodeid, reason in skipped:
        terminalreporter.write_line(f"{nodeid}: {reason}", red=True)
