"""Fixtures any test module may use: one etcd for the session, a clean prefix per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from shared import keys
from shared.store import Store
from tests.support.cluster import Cluster
from tests.support.harness import Etcd

# A time limit per example measures the machine's load, not the code: property tests
# bound their work by the number of examples only.
settings.register_profile("hapair", deadline=None)
settings.load_profile("hapair")


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    """A real etcd on free ports, shared by the session; use ``store`` for a clean prefix."""
    server = Etcd().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def store(etcd: Etcd) -> AsyncIterator[Store]:
    """A connection to the session's etcd with nothing under ``/hapair/v1``."""
    s = Store(etcd.url, timeout=2.0)
    await s.call(lambda: s.client.delete_prefix(keys.b(keys.PREFIX + "/")))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def cluster(etcd: Etcd, store: Store, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Agents as real processes against the session's etcd; at the end, every test
    proves from the services' own records that no two nodes ran a service at once."""
    c = Cluster(etcd, tmp_path)
    try:
        yield c
    finally:
        await c.stop_all()
    # Checked after every agent stopped, so the last runs are complete too.
    c.assert_no_overlap()


# A skipped test proves nothing. Outside CI a skip is reported loudly at the end; under
# CI=true it fails the run, unless the test is marked ``may_skip`` (a skip that weakens
# no safety claim, e.g. a machine without an IPv6 loopback).
_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_SKIPPED = "hapair_skipped"  # a report's property: it travels from xdist's workers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "may_skip: a skip of this test weakens no safety claim (allowed under CI)"
    )


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
