"""Fixtures any test module may use: one etcd for the session, a clean prefix per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster
from harness import Etcd

from shared import keys
from shared.store import Store


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
_skipped: list[tuple[str, str]] = []


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
    _skipped.append((item.nodeid, reason))
    if _IN_CI and item.get_closest_marker("may_skip") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which proves nothing: {reason}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _skipped:
        return
    terminalreporter.section("SKIPPED TESTS: these claims were not checked", sep="!", red=True)
    for nodeid, reason in _skipped:
        terminalreporter.write_line(f"{nodeid}: {reason}", red=True)
