"""A node's packages, installed by the agent's part that does it (``packages.py``) on
real files, a real aiohttp file server, real ``install:`` processes as another user and
a real full disk (a small tmpfs): what is installed, where, as whom, and that a failure
at any step leaves the version installed before it whole and says why.

No etcd: the pair comes from a parsed site file, the status from the part itself (the
agent publishes the same list in its node status: ``test_packages.py``)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import ssl
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import pki
from hapair.shared.log import EventLog
from hapair.shared.records import PackageStatus, ServiceStatus
from hapair.shared.topology import Node, Pair, Site, parse_site
from hapair.workshop_agent.package_archive import MARKER
from hapair.workshop_agent.package_fetch import Limits
from hapair.workshop_agent.packages import RECONCILE_S, Packages
from hapair.workshop_agent.run_as import ServiceUsers
from hapair.workshop_agent.settings import ca_context
from tests.support.cluster import holds, pid_alive, until
from tests.support.harness import ROOT
from tests.support.package_lab import build, package, serving, small_disk
from tests.support.tls_etcd import TestPki

NOBODY = pwd.getpwnam("nobody")
FAST = Limits(attempts=3, backoff_s=0.1, backoff_max_s=0.2, read_s=5.0)


class Lab:
    """One node's packages, driven by site files the test gives it."""

    def __init__(
        self, tmp: Path, state: Path | None = None, ssl: ssl.SSLContext | None = None
    ) -> None:
        tmp.mkdir(exist_ok=True)
        self.tmp = tmp
        self.files = tmp / "files"
        self.files.mkdir(exist_ok=True)
        self.state = state or tmp / "state"
        self.state.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.site: Site | None = None
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.running: list[ServiceStatus] = []  # what the supervisor would say runs
        self.packages = Packages(
            self.state,
            ServiceUsers(allow_root=True),
            EventLog("test.packages", node="a"),
            place=self.place,
            event=lambda kind, reason="", **details: self.events.append((kind, reason, details)),
            changed=lambda: None,
            in_use=lambda: self.running,
            ssl=ssl,
            limits=FAST,
        )

    def place(self) -> tuple[Pair | None, Node | None]:
        if self.site is None:
            return None, None
        pair = next(self.site.pairs())
        return pair, pair.nodes[0]

    def apply(self, services: list[dict[str, Any]]) -> None:
        nodes = [{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "127.0.0.2"}]
        pair = {"name": "p", "nodes": nodes, "services": services}
        self.site = parse_site({"site": "s", "workshops": [{"name": "w", "pairs": [pair]}]}, "t")
        self.packages.wake.set()

    def status(self, service: str) -> PackageStatus | None:
        return next((s for s in self.packages.statuses() if s.service == service), None)

    async def settled(
        self, service: str, version: str, state: str, timeout: float = 30.0
    ) -> PackageStatus:
        async def done() -> PackageStatus | None:
            st = self.status(service)
            ok = st is not None and st.version == version and st.state == state
            return st if ok and not self.packages._tasks else None

        return await until(done, timeout, f"{service} {version} {state}")

    def dirs(self, service: str) -> list[str]:
        d = self.state / "packages" / service
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def downloads(self) -> list[str]:
        d = self.state / "packages" / ".downloads"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    # Outside pytest's own directories (0700): a service's user must reach its package.
    reachable = Path(tempfile.mkdtemp(prefix="hapair-packages-"))
    os.chmod(reachable, 0o711)
    lab = Lab(tmp_path, reachable / "state")
    task = asyncio.create_task(lab.packages.run())
    try:
        yield lab
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        shutil.rmtree(reachable, ignore_errors=True)


def service(pkg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "app", "command": ["{package.dir}/bin/app"], "package": pkg, **extra}


async def installed_v1(lab: Lab) -> Path:
    """Version 1 of ``app`` from a file:// URL, installed: its directory."""
    v1 = build(lab.files, "app", "1.0")
    lab.apply([service(package(v1, v1.as_uri(), "1.0"))])
    await lab.settled("app", "1.0", "installed")
    pair, _ = lab.place()
    assert pair is not None
    spec = pair.services[0]
    top = lab.packages.ready_dir(spec)
    assert top is not None and (top / "VERSION").read_text() == "1.0"
    return top


def snapshot(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in top.rglob("*") if p.is_file()}


async def test_a_file_url_package_is_installed_read_only_and_runs_install_as_the_user(
    lab: Lab,
) -> None:
    archive = build(
        lab.files,
        "app",
        "1.0",
        {"setup.sh": '#!/bin/sh\nid -u > built-by\necho "$HAPAIR_PACKAGE_DIR" > built-in\n'},
    )
    pkg = package(archive, archive.as_uri(), "1.0", install={"command": ["./setup.sh"]})
    lab.apply([service(pkg, user="nobody")])
    status = await lab.settled("app", "1.0", "installed")
    top = lab.state / "packages" / "app" / f"1.0-{pkg['sha256'][:12]}"
    assert status.installed == [top.name] and status.detail is None
    assert (top / MARKER).is_file()
    # install: ran as the service's user, in the directory's final place.
    assert (top / "built-by").read_text().strip() == str(NOBODY.pw_uid)
    assert (top / "built-in").read_text().strip() == str(top)
    # Then the tree became the agent's, readable by the service's group, writable by
    # no one else; nothing set-uid.
    for path in [top, *(p for p in top.rglob("*") if p.name != MARKER)]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (os.geteuid(), NOBODY.pw_gid), path
        assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID), path
    assert stat.S_IMODE((top / "bin/app").stat().st_mode) & stat.S_IXGRP
    # The service's user reaches it: the state directory lets others through.
    assert lab.state.stat().st_mode & stat.S_IXOTH
    assert not lab.state.stat().st_mode & stat.S_IROTH
    assert lab.downloads() == []
    # Lacking the version the site names until then, the node was drifted meanwhile.
    assert [e[0] for e in lab.events] == [
        "package drift",
        "package installed",
        "package drift cleared",
    ]


async def test_an_http_package_downloads_and_a_cut_transfer_resumes(lab: Lab) -> None:
    archive = build(lab.files, "app", "2.0", {"noise": os.urandom(100_000).hex()})
    async with serving(lab.files) as server:
        server.cut[archive.name] = 50_000  # every answer ends after 50 kB
        url = f"{server.url}/{archive.name}"
        lab.apply([service(package(archive, url, "2.0"))])
        status = await lab.settled("app", "2.0", "installed")
    assert len(status.installed) == 1
    ranges = [r for name, r in server.requests if name == archive.name]
    assert ranges[0] is None and ranges[1] == "bytes=50000-"  # resumed, not started over


async def test_https_is_checked_against_the_site_ca(tmp_path: Path, test_pki: TestPki) -> None:
    """A server whose certificate the site CA signed is trusted; one of another CA is not."""
    archive = build(tmp_path, "app", "1.0")
    other = tmp_path / "other-ca"
    pki.init(other, "elsewhere")
    pki.issue(other, pki.Kind.REGISTRY, "files", ["127.0.0.1"])
    for ca, server_files, state in [
        (test_pki.dir, test_pki.files("files", pki.Kind.REGISTRY), "installed"),
        (test_pki.dir, pki.TlsFiles.issued(other, "files"), "failed"),
    ]:
        lab = Lab(tmp_path / state, ssl=ca_context(ca / pki.CA_CERT))
        task = asyncio.create_task(lab.packages.run())
        try:
            async with serving(archive.parent, server_files) as server:
                lab.apply([service(package(archive, f"{server.url}/{archive.name}", "1.0"))])
                status = await lab.settled("app", "1.0", state)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if state == "failed":
            assert status.detail is not None and "certificate verify failed" in status.detail


async def test_a_bad_hash_leaves_the_old_version_and_says_why(lab: Lab) -> None:
    old = await installed_v1(lab)
    before = snapshot(old)
    v2 = build(lab.files, "app", "2.0")
    bad = {**package(v2, v2.as_uri(), "2.0"), "sha256": "0" * 64}
    lab.apply([service(bad)])
    status = await lab.settled("app", "2.0", "failed")
    assert status.detail is not None and "sha256 mismatch" in status.detail
    assert status.installed == [old.name]
    assert lab.dirs("app") == [old.name] and snapshot(old) == before
    assert lab.downloads() == []  # the wrong file is not kept
    assert lab.events[-1][0] == "package failed" and "sha256" in lab.events[-1][1]


async def test_a_404_and_a_transfer_always_cut_leave_the_old_version(lab: Lab) -> None:
    old = await installed_v1(lab)
    before = snapshot(old)
    v2 = build(lab.files, "app", "2.0", {"big": "y" * 100_000})
    async with serving(lab.files) as server:
        lab.apply([service(package(v2, f"{server.url}/missing-2.0.tar.gz", "2.0"))])
        status = await lab.settled("app", "2.0", "failed")
        assert status.detail is not None and "HTTP 404" in status.detail
        assert lab.dirs("app") == [old.name] and snapshot(old) == before

        server.cut[v2.name] = 10  # every attempt ends 10 bytes further: never whole
        lab.apply([service(package(v2, f"{server.url}/{v2.name}", "2.1"))])
        status = await lab.settled("app", "2.1", "failed")
    assert status.detail is not None and "incomplete" in status.detail
    assert status.installed == [old.name]
    assert lab.dirs("app") == [old.name] and snapshot(old) == before


@pytest.mark.parametrize(
    ("setup", "install", "says"),
    [
        ("#!/bin/sh\necho 'pip: no matching wheel' >&2\nexit 3\n", {}, "exited with code 3"),
        ("#!/bin/sh\nexec sleep 60\n", {"timeout_s": 0.5}, "not done within 0.5s"),
    ],
)
async def test_a_failed_install_leaves_nothing_of_the_new_version(
    lab: Lab, setup: str, install: dict[str, Any], says: str
) -> None:
    old = await installed_v1(lab)
    before = snapshot(old)
    v2 = build(lab.files, "app", "2.0", {"setup.sh": setup})
    pkg = package(v2, v2.as_uri(), "2.0", install={"command": ["./setup.sh"], **install})
    lab.apply([service(pkg)])
    status = await lab.settled("app", "2.0", "failed")
    assert status.detail is not None and says in status.detail
    if "code 3" in says:
        assert "no matching wheel" in status.detail  # the install's own last words
    assert lab.dirs("app") == [old.name] and snapshot(old) == before


async def test_the_last_two_versions_are_kept(lab: Lab) -> None:
    names = []
    for version in ("1", "2", "3"):
        archive = build(lab.files, "app", version)
        pkg = package(archive, archive.as_uri(), version)
        lab.apply([service(pkg)])
        await lab.settled("app", version, "installed")
        names.append(f"{version}-{pkg['sha256'][:12]}")
    assert lab.dirs("app") == names[1:]
    assert lab.status("app").installed == [names[2], names[1]]  # type: ignore[union-attr]


async def test_a_version_a_process_runs_is_kept_and_a_removed_service_goes_once_stopped(
    lab: Lab,
) -> None:
    names = []
    for version in ("1", "2"):
        archive = build(lab.files, "app", version)
        pkg = package(archive, archive.as_uri(), version)
        lab.apply([service(pkg), {"name": "tool", "command": ["x"], "package": pkg}])
        await lab.settled("app", version, "installed")
        await lab.settled("tool", version, "installed")
        names.append(f"{version}-{pkg['sha256'][:12]}")
    # app's process still runs version 1 when 3 comes: 1 stays beside 2 and 3.
    lab.running = [
        ServiceStatus(name="app", placement="active", state="running", pid=1, package=names[0])
    ]
    archive = build(lab.files, "app", "3")
    pkg = package(archive, archive.as_uri(), "3")
    lab.apply([service(pkg), {"name": "tool", "command": ["x"], "package": pkg}])
    await lab.settled("app", "3", "installed")
    names.append(f"3-{pkg['sha256'][:12]}")
    assert lab.dirs("app") == names
    assert lab.dirs("tool") == names[1:]
    # tool leaves the site while its process still runs: kept until it has stopped.
    lab.running.append(ServiceStatus(name="tool", placement="active", state="running", pid=2))
    lab.apply([service(pkg)])
    await holds(
        lambda: asyncio.sleep(0, lab.dirs("tool") == names[1:]),
        3 * RECONCILE_S,
        "tool's versions kept while its process runs",
    )
    lab.running = lab.running[:1]
    lab.packages._sweep_at = 0.0  # as at its next look (every 30 s while one is kept)
    await until(lambda: asyncio.sleep(0, lab.dirs("tool") == []), 10, "tool's versions removed")
    assert lab.dirs("app") == names  # app's process still runs 1
    lab.running = []
    lab.packages._sweep_at = 0.0
    await until(lambda: asyncio.sleep(0, lab.dirs("app") == names[1:]), 10, "app's 1 removed")


async def test_one_download_at_a_time_from_one_origin(lab: Lab) -> None:
    archives = [build(lab.files, name, "1") for name in ("one", "two", "three")]
    async with serving(lab.files) as server:
        server.delay_s = 0.3
        lab.apply(
            [
                {
                    "name": a.name.split("-")[0],
                    "command": ["x"],
                    "package": package(a, f"{server.url}/{a.name}", "1"),
                }
                for a in archives
            ]
        )
        for name in ("one", "two", "three"):
            await lab.settled(name, "1", "installed")
    assert len(server.requests) == 3 and server.most_at_once == 1


async def test_a_full_disk_leaves_the_old_version_and_says_so(tmp_path: Path) -> None:
    with small_disk(tmp_path / "state", "1m") as mounted:
        if not mounted:
            pytest.skip("this process may not mount a tmpfs (needs CAP_SYS_ADMIN)")
        lab = Lab(tmp_path, tmp_path / "state")
        task = asyncio.create_task(lab.packages.run())
        try:
            old = await installed_v1(lab)
            before = snapshot(old)
            big = build(lab.files, "app", "2.0", {"noise": os.urandom(2_000_000).hex()})
            lab.apply([service(package(big, big.as_uri(), "2.0"))])
            status = await lab.settled("app", "2.0", "failed")
            assert status.detail is not None and "no space left on device" in status.detail
            assert lab.dirs("app") == [old.name] and snapshot(old) == before
            assert lab.downloads() == []  # the part that filled the disk is gone
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


RUNNER = """
import asyncio, sys
from pathlib import Path
from tests.integration.test_package_install import Lab, service
from tests.support.package_lab import package

async def main() -> None:
    lab = Lab(Path(sys.argv[1]))
    archive = Path(sys.argv[2])
    pkg = package(archive, archive.as_uri(), "1", install={"command": ["./setup.sh"]})
    lab.apply([service(pkg, env={"PIDFILE": sys.argv[3]})])
    await lab.packages.run()

asyncio.run(main())
"""


async def test_an_install_dies_with_its_agent(tmp_path: Path) -> None:
    """An agent killed mid-install leaves no install process behind to write into the
    directory its next run removes."""
    archive = build(
        tmp_path, "app", "1", {"setup.sh": '#!/bin/sh\necho $$ > "$PIDFILE"\nexec sleep 600\n'}
    )
    pidfile = tmp_path / "install.pid"
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUNNER,
        str(tmp_path / "agent"),
        str(archive),
        str(pidfile),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:

        async def started() -> int | None:
            text = pidfile.read_text().strip() if pidfile.exists() else ""
            return int(text) if text else None

        pid = await until(started, 30, "the install running")
        assert pid_alive(pid)
    finally:
        agent.kill()
        await agent.wait()

    async def gone() -> bool:
        return not pid_alive(pid)

    try:
        await until(gone, 10, "the install process gone with its agent")
    finally:
        if pid_alive(pid):  # the test failed: nothing of it is left running
            os.kill(pid, signal.SIGKILL)
