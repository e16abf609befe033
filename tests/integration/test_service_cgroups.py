"""Each service in its own cgroup: the supervisor with real processes, no agent.

A service whose grandchild double-forks and calls ``setsid`` leaves the service's
process group; only its cgroup still holds it. The exec guard, the child's last step
before the service's program, joins that cgroup, waits until the agent releases it (its
watchdog knows the run) and refuses to run the program once the fence point it was given
has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hapair.shared.clock import boottime
from hapair.shared.log import EventLog
from hapair.shared.topology import parse_site
from hapair.workshop_agent import cgroups
from hapair.workshop_agent.cgroups import CgroupTree
from hapair.workshop_agent.exec_guard import REFUSED
from hapair.workshop_agent.run_as import ServiceUsers
from hapair.workshop_agent.service_process import EXEC_GUARD
from hapair.workshop_agent.supervisor import Supervisor
from hapair.workshop_agent.watchdog import WatchdogLink
from tests.integration.test_fence_services import escaped, escaping_service
from tests.support.cluster import pid_alive, until
from tests.support.harness import ROOT

EPOCH = 9


def guard(until: float, cgroup: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", EXEC_GUARD, repr(until), cgroup, "-", "-", "--", *argv],
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_the_guard_waits_for_its_release_and_refuses_without_it(tmp_path: Path) -> None:
    """The program runs only once the agent wrote its byte; a pipe closed without one
    (the agent died or chose not to start it) and the program never runs."""
    ran = tmp_path / "ran"
    for release in (False, True):
        go_read, go = os.pipe()
        argv = [sys.executable, "-I", "-S", EXEC_GUARD, repr(boottime() + 30), "-", str(go_read)]
        child = subprocess.Popen(
            [*argv, "-", "--", "/usr/bin/touch", str(ran)],
            pass_fds=(go_read,),
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(go_read)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(0.5)  # a safety property (it must not go on), not a timing bound
        assert not ran.exists()
        if release:
            os.write(go, b"\1")
        os.close(go)
        _, err = child.communicate(timeout=10)
        assert child.returncode == (0 if release else REFUSED), err
        assert ran.exists() == release
        if not release:
            assert "did not release it" in err


def released_with(until: float, word: bytes, ran: Path) -> tuple[int, str]:
    """The guard given ``until``, released with ``word``: its exit code and stderr."""
    go_read, go = os.pipe()
    argv = [sys.executable, "-I", "-S", EXEC_GUARD, repr(until), "-", str(go_read), "-"]
    child = subprocess.Popen(
        [*argv, "--", "/usr/bin/touch", str(ran)],
        pass_fds=(go_read,),
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(go_read)
    os.write(go, word)
    os.close(go)
    _, err = child.communicate(timeout=10)
    return child.returncode, err


def test_the_guard_checks_the_fence_point_its_release_carries(tmp_path: Path) -> None:
    """A term beat moves the fence point on every few tens of milliseconds: the agent
    releases the child with its point then, and that one counts, either way."""
    ran = tmp_path / "ran"
    code, err = released_with(boottime() - 0.001, repr(boottime() + 30).encode(), ran)
    assert code == 0 and ran.exists(), err
    ran.unlink()
    code, err = released_with(boottime() + 30, repr(boottime() - 0.001).encode(), ran)
    assert code == REFUSED and "fence point has passed" in err
    assert not ran.exists()


def test_the_guard_refuses_to_run_a_program_past_the_fence_point(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    done = guard(boottime() - 0.001, "-", "/usr/bin/touch", str(ran))
    assert done.returncode == REFUSED
    assert "fence point has passed" in done.stderr
    assert not ran.exists()


def test_the_guard_runs_the_program_in_its_own_process_before_the_fence_point() -> None:
    done = guard(boottime() + 30, "-", "/bin/sh", "-c", "echo $$ $PPID")
    assert done.returncode == 0, done.stderr
    pid, _ = done.stdout.split()
    assert int(pid) > 0  # the program replaced the guard (exec), it did not run beside it


@pytest.fixture
def tree() -> Iterator[CgroupTree]:
    t, why = CgroupTree.create("cgtest")
    if t is None:
        pytest.skip(f"no cgroup v2 here: {why}")  # the fallback is tested below
    try:
        yield t
    finally:
        t.close()


def test_the_guard_puts_the_program_in_the_cgroup_before_it_runs(tree: CgroupTree) -> None:
    run = tree.new_run("svc")
    assert run is not None
    done = guard(boottime() + 30, str(run), "/bin/cat", "/proc/self/cgroup")
    assert done.returncode == 0, done.stderr
    mount = cgroups._mount_point()
    assert mount is not None
    assert f"0::/{run.relative_to(mount)}" in done.stdout.splitlines()


# -- the supervisor ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Supervisor]:
    """A supervisor of the escaping service, with a real watchdog that has no deadline
    (so only the supervisor kills here)."""
    site = parse_site(
        {
            "site": "t",
            "workshops": [
                {
                    "name": "w",
                    "pairs": [
                        {
                            "name": "p",
                            "nodes": [
                                {"name": "a", "address": "127.0.147.1"},
                                {"name": "b", "address": "127.0.147.2"},
                            ],
                            "services": [escaping_service("esc", tmp_path / "escaped.pid")],
                        }
                    ],
                }
            ],
        },
        "test",
    )
    pair = site.pair("p")
    assert pair is not None and pair.node("a") is not None
    link = WatchdogLink()
    link.start()
    sup = Supervisor(
        pair,
        pair.nodes[0],
        EventLog("test"),
        link,
        may_run=lambda: True,
        paused=lambda: False,
        on_change=lambda: None,
        state_dir=tmp_path / "state",
        env={},
        # Its services run as this test's user, root: allowed here in so many words.
        users=ServiceUsers(allow_root=True),
    )
    try:
        yield sup
    finally:
        await sup.stop_all()
        link.close()


@pytest.fixture
async def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Supervisor]:
    monkeypatch.chdir(ROOT)  # the watchdog runs as ``python -m hapair.workshop_agent.watchdog``
    async with running(tmp_path) as sup:
        yield sup


async def gone(pid: int) -> bool:
    return not pid_alive(pid)


async def test_a_fence_kills_the_whole_cgroup(supervisor: Supervisor, tmp_path: Path) -> None:
    if supervisor.cgroups is None:
        pytest.skip("no cgroup v2 here")
    supervisor.activate(EPOCH)
    grandchild = await escaped(tmp_path / "escaped.pid")
    try:
        supervisor.kill_active(0.2)
        await until(lambda: gone(grandchild), 5, "the escaped grandchild killed by the fence")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
    runner = supervisor.runners["esc"]
    await until(lambda: asyncio.sleep(0, runner.cgroup is None), 5, "the run's cgroup removed")
    assert supervisor.cgroups is not None
    assert not [p for p in supervisor.cgroups.root.iterdir() if p.is_dir()]


async def test_without_cgroups_fencing_falls_back_to_the_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where cgroup v2 is missing the agent says so and kills process groups: the service
    and what stays in its group die; a process that left the group survives (the limit
    the warning names)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(cgroups, "_mount_point", lambda: None)
    async with running(tmp_path) as sup:
        assert sup.cgroups is None
        assert "services fenced by process group only" in caplog.text
        sup.activate(EPOCH)
        grandchild = await escaped(tmp_path / "escaped.pid")
        runner = sup.runners["esc"]
        await until(lambda: asyncio.sleep(0, runner.proc is not None), 5, "service forked")
        assert runner.proc is not None
        leader = runner.proc.pid
        try:
            sup.kill_active(0.2)
            await until(lambda: gone(leader), 5, "the service killed by the fence")
            assert pid_alive(grandchild), "left its group: beyond a process-group fence"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)


def signals_reaching(monkeypatch: pytest.MonkeyPatch, cgroup: Path) -> list[int]:
    """Record, for every SIGTERM sent, each process of ``cgroup`` it reached (a process
    group's signal reaches every member of the group), then send it."""
    reached: list[int] = []
    kill, killpg = os.kill, os.killpg

    def members(pgid: int) -> list[int]:
        out = []
        for pid in cgroups.procs(cgroup):
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == pgid:
                    out.append(pid)
        return out

    def record_kill(pid: int, sig: int) -> None:
        if sig == signal.SIGTERM:
            reached.append(pid)
        kill(pid, sig)

    def record_killpg(pgid: int, sig: int) -> None:
        if sig == signal.SIGTERM:
            reached.extend(members(pgid))
        killpg(pgid, sig)

    monkeypatch.setattr(os, "kill", record_kill)
    monkeypatch.setattr(os, "killpg", record_killpg)
    return reached


@pytest.mark.parametrize("stop", ["planned", "fence"])
async def test_each_process_of_a_service_gets_one_sigterm(
    supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """A second SIGTERM can land while the service's handler for the first runs: a
    handler that takes a lock (or is not reentrant) then hangs until the SIGKILL, and
    the stop takes the whole grace. The process group's signal and the cgroup's reach
    each process once between them."""
    if supervisor.cgroups is None:
        pytest.skip("no cgroup v2 here")
    supervisor.activate(EPOCH)
    grandchild = await escaped(tmp_path / "escaped.pid")
    runner = supervisor.runners["esc"]
    assert runner.proc is not None and runner.cgroup is not None
    leader = runner.proc.pid
    reached = signals_reaching(monkeypatch, runner.cgroup)
    try:
        if stop == "planned":
            await supervisor.deactivate()
        else:
            supervisor.kill_active(5)
            await until(lambda: gone(leader), 5, "the service ended on its SIGTERM")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
    assert leader in reached and grandchild in reached
    twice = sorted({pid for pid in reached if reached.count(pid) > 1})
    assert not twice, f"sent SIGTERM more than once: {twice} (all: {reached})"
