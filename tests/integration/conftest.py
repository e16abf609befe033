"""Fixtures of the integration tests: one etcd for the session, a clean prefix per test,
agents as real processes.

etcd runs with TLS and client-certificate authentication, and every agent shows its own
certificate and gets its pair's peer key, as on a plant; a test marked ``lab`` gets the
lab mode instead (an ``http://`` etcd, no certificates, no peer key). The PKI is made
once per test process: one CA, each certificate issued the first time a name needs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hapair.shared import keys
from hapair.shared.store import Store
from tests.support import cluster as clusters
from tests.support.cluster import Cluster, checked_cluster, until
from tests.support.etcd_relay import RelayThread
from tests.support.harness import Etcd, running_etcd
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd, running_tls_etcd


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab: the lab mode (http:// etcd, no certificates, no peer keys)"
    )


LOG_TAIL = 60  # lines of each agent's log in a failure report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    clusters.MADE.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that failed shows the end of each of its agents' logs: a failure seen only
    under CI's load is then read from its report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and report.when in ("setup", "call"):
        for c in clusters.MADE:
            for node, tail in c.log_tails(LOG_TAIL):
                report.sections.append((f"agent {node}: the end of its log", tail))


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """The session's CA, etcd's and the admin's certificates (per test process)."""
    return TestPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def secure_etcd(test_pki: TestPki) -> Iterator[TlsEtcd]:
    """The session's etcd: TLS and client certificates on both ports."""
    with running_tls_etcd(test_pki.dir, admin=ADMIN) as server:
        yield server


@pytest.fixture(scope="session")
def lab_etcd() -> Iterator[Etcd]:
    """The session's lab-mode etcd (plain ``http://``), started for the first test that
    asks for the lab mode."""
    with running_etcd() as server:
        yield server


@pytest.fixture
def etcd(request: pytest.FixtureRequest) -> Etcd:
    """A real etcd on free ports, shared by the session; use ``store`` for a clean prefix.
    TLS with client certificates, unless the test is marked ``lab``."""
    if request.node.get_closest_marker("lab") is not None:
        lab: Etcd = request.getfixturevalue("lab_etcd")
        return lab
    secure: TlsEtcd = request.getfixturevalue("secure_etcd")
    return secure


@pytest.fixture
async def store(etcd: Etcd) -> AsyncIterator[Store]:
    """A connection to the session's etcd (as its admin) with nothing under ``/hapair/v1``."""
    s = Store(etcd.url, timeout=2.0, tls=etcd.tls)

    async def cleared() -> bool:
        await s.call(lambda: s.client.delete_prefix(keys.b(keys.PREFIX + "/")))
        return True

    # On a loaded machine gRPC's first connection may time out: the set-up waits for it
    # (a test that means to see etcd unavailable does so itself).
    await until(cleared, 30, "the session's etcd cleared for this test")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def link(etcd: Etcd) -> AsyncIterator[RelayThread]:
    """An agent's link to the session's etcd, a relay on a thread of its own, to slow or
    cut (asked for before ``cluster``, it outlives the agents, which resign through it)."""
    relay = RelayThread(etcd.url)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


@pytest.fixture
async def cluster(etcd: Etcd, store: Store, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Agents as real processes against the session's etcd; at the end, every test
    proves from the services' own records that no two nodes ran a service at once."""
    async with checked_cluster(etcd, tmp_path) as c:
        yield c


@pytest.fixture
def quick_download_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agents started by the test wait 0.1 s, not 1 s, before their second try of a
    package download, and double that each time as they would (five tries: 1.5 s, not
    15 s, until a download fails): for tests whose subject is what follows a failure."""
    monkeypatch.setenv("HAPAIR_TEST_FETCH_BACKOFF_S", "0.1")
