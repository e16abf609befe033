"""The watchdog process: real processes, real deadlines on the shared clock (BOOTTIME).

Each test starts ``python -m hapair.workshop_agent.watchdog`` through ``WatchdogLink`` and
``sleep 60`` services in their own sessions (process group id = pid), then watches
what the watchdog does to them. Every process is stopped by its pid in a finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hapair.shared.clock import boottime
from hapair.shared.store import Store
from hapair.workshop_agent.watchdog import WatchdogLink, start_time
from tests.support.harness import ROOT, Etcd, wait_for

Spawn = Callable[[], subprocess.Popen[bytes]]


def alive(proc: subprocess.Popen[bytes]) -> bool:
    """True while the process runs; reaps it (no zombie) once it has died."""
    return proc.poll() is None


def dead(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def wait_until(at: float) -> None:
    """Block until ``CLOCK_BOOTTIME`` reaches ``at`` (the watchdog's own clock)."""
    while (left := at - boottime()) > 0:
        time.sleep(min(left, 0.01))


def gone(pid: int) -> bool:
    """True once a process that is not our child has died (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def watchdog_proc(link: WatchdogLink) -> subprocess.Popen[bytes]:
    assert link._proc is not None, "watchdog not started"
    return link._proc


def kills_done(link: WatchdogLink) -> None:
    """Close the link and wait for the watchdog to exit. Closing kills what is still
    registered; once the watchdog has exited every kill it will ever make is done."""
    proc = watchdog_proc(link)
    link.close()
    wait_for(lambda: dead(proc), 2.0, "watchdog exited")


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``sleep 60`` services, each the leader of its own session and group."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        procs.append(proc)
        assert os.getpgid(proc.pid) == proc.pid
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch) -> Iterator[WatchdogLink]:
    monkeypatch.chdir(ROOT)  # the watchdog runs as ``python -m hapair.workshop_agent.watchdog``
    wd = WatchdogLink()
    wd.start()
    try:
        yield wd
    finally:
        proc = wd._proc
        wd.close()
        # The watchdog ignores SIGTERM by design; if closing its pipe did not end it, kill it.
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_a_missed_deadline_kills_the_group_then_and_not_before(
    link: WatchdogLink, spawn: Spawn
) -> None:
    service = spawn()
    link.add(service.pid)
    deadline = boottime() + 0.3
    link.deadline(deadline)

    wait_until(deadline - 0.1)
    assert alive(service), "killed before its deadline"
    wait_for(lambda: dead(service), deadline + 1.0 - boottime(), "service killed")
    assert boottime() >= deadline
    assert service.returncode == -signal.SIGKILL
    # The watchdog goes on serving after acting.
    assert alive(watchdog_proc(link))


def test_the_whole_group_is_killed_not_only_its_leader(link: WatchdogLink, spawn: Spawn) -> None:
    service = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
    )
    child_pid = 0
    try:
        assert service.stdout is not None
        child_pid = int(service.stdout.readline())
        link.add(service.pid)
        link.deadline(boottime() + 0.1)
        wait_for(lambda: dead(service), 2.0, "group leader killed")

        # The grandchild was reparented to init, which may take its time to reap it.
        wait_for(lambda: gone(child_pid), 1.0, "grandchild killed")
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
        service.wait(5)
        if service.stdout is not None:
            service.stdout.close()


def test_each_missed_deadline_is_reported_to_the_link_once(
    link: WatchdogLink, spawn: Spawn, tmp_path: Path
) -> None:
    """What the agent counts once it runs again (``hapair_agent_watchdog_firings``): one
    report per deadline missed, although a registered data directory makes the watchdog
    act again on every command that comes while the deadline has passed."""
    link.add_data_dir(tmp_path)
    for n in (1, 2):
        service = spawn()
        link.add(service.pid)
        link.deadline(boottime() + 0.1)
        wait_for(lambda: dead(service), 2.0, "service killed")  # noqa: B023
        link.remove_data_dir(tmp_path)
        link.add_data_dir(tmp_path)  # two more commands past the deadline
        wait_for(lambda: link.read_reports() or link.firings >= n, 2.0, "the firing reported")  # noqa: B023
        time.sleep(0.2)
        link.read_reports()
        assert link.firings == n
    assert link.read_reports() == 0


def test_extending_the_deadline_in_time_keeps_the_service(link: WatchdogLink, spawn: Spawn) -> None:
    service = spawn()
    link.add(service.pid)
    last = boottime() + 0.4
    link.deadline(last)
    keep_until = boottime() + 0.6
    # Extend every 0.1 s, as the agent does on each keepalive, each time while the
    # deadline is still 0.3 s away.
    while boottime() < keep_until:
        wait_until(last - 0.3)
        assert alive(service), "killed although the deadline was extended in time"
        last = boottime() + 0.4
        link.deadline(last)
    assert alive(service)
    # Stop extending: now the last deadline applies.
    wait_until(last - 0.1)
    assert alive(service)
    wait_for(lambda: dead(service), last + 1.0 - boottime(), "service killed")
    assert boottime() >= last


def test_an_infinite_deadline_disarms(link: WatchdogLink, spawn: Spawn) -> None:
    service = spawn()
    link.add(service.pid)
    soon = boottime() + 0.2
    link.deadline(soon)
    link.deadline(float("inf"))  # no deadline: what a new link sends first
    wait_until(soon + 0.3)
    assert alive(service)


def test_a_deadline_of_minus_infinity_kills_at_once(link: WatchdogLink, spawn: Spawn) -> None:
    # The agent sends it when its session has no lease at all.
    service = spawn()
    link.add(service.pid)
    link.deadline(-float("inf"))
    wait_for(lambda: dead(service), 1.0, "service killed")


def test_closing_the_link_kills_registered_groups_at_once_and_exits(
    link: WatchdogLink, spawn: Spawn
) -> None:
    services = [spawn(), spawn()]
    for s in services:
        link.add(s.pid)
    link.deadline(boottime() + 60)
    proc = watchdog_proc(link)
    started = boottime()
    link.close()  # end of file, as when the agent dies
    wait_for(lambda: all(dead(s) for s in services), 1.0, "services killed on end of file")
    wait_for(lambda: dead(proc), 1.0, "watchdog exited")
    assert proc.returncode == 0
    assert boottime() - started < 2.0


def test_a_killed_agent_closes_the_pipe_and_its_services_die(spawn: Spawn) -> None:
    # The agent itself is killed with SIGKILL: the kernel closes its end of the pipe.
    service = spawn()
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from hapair.workshop_agent.watchdog import WatchdogLink\n"
            "link = WatchdogLink()\n"
            f"link.add({service.pid})\n"
            "link.deadline(time.clock_gettime(time.CLOCK_BOOTTIME) + 60)\n"
            "print(link.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    watchdog_pid = 0
    try:
        assert agent.stdout is not None
        watchdog_pid = int(agent.stdout.readline())
        assert alive(service)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(5)
        wait_for(lambda: dead(service), 1.0, "service killed after the agent's death")
        wait_for(lambda: gone(watchdog_pid), 1.0, "watchdog exited after the agent's death")
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGKILL)
        agent.wait(5)
        if agent.stdout is not None:
            agent.stdout.close()
        if watchdog_pid and not gone(watchdog_pid):
            # Not our child: it was reparented; make sure it is gone.
            with contextlib.suppress(ProcessLookupError):
                os.kill(watchdog_pid, signal.SIGKILL)


def test_a_removed_group_is_no_longer_killed(link: WatchdogLink, spawn: Spawn) -> None:
    kept, released = spawn(), spawn()
    link.add(kept.pid)
    link.add(released.pid)
    link.remove(released.pid)
    link.deadline(boottime() + 0.1)
    wait_for(lambda: dead(kept), 2.0, "registered service killed")
    kills_done(link)
    assert alive(released)


def test_a_group_killed_at_a_deadline_is_forgotten(link: WatchdogLink, spawn: Spawn) -> None:
    first = spawn()
    link.add(first.pid)
    link.deadline(boottime() + 0.1)
    wait_for(lambda: dead(first), 2.0, "first service killed")
    # Once a new deadline comes, a group added is kept until that one.
    later = boottime() + 0.4
    link.deadline(later)
    second = spawn()
    link.add(second.pid)
    wait_until(later - 0.1)
    assert alive(second)
    wait_for(lambda: dead(second), later + 1.0 - boottime(), "second service killed")


def test_a_group_added_after_the_deadline_has_passed_is_killed_at_once(
    link: WatchdogLink, spawn: Spawn
) -> None:
    # An agent that forked a service after a freeze it has not noticed yet: its term may
    # be another node's already.
    first = spawn()
    link.add(first.pid)
    link.deadline(boottime() + 0.1)
    wait_for(lambda: dead(first), 2.0, "first service killed")
    late = spawn()
    link.add(late.pid)
    wait_for(lambda: dead(late), 1.0, "a service registered after the deadline killed")


@pytest.mark.parametrize(
    "bad",
    [
        ["frobnicate 12", "add", "del 1 2", "deadline", ""],
        ["add not-a-number", "del 1.5", "deadline soon"],
    ],
    ids=["unknown-or-wrong-arity", "malformed-numbers"],
)
def test_bad_command_lines_are_ignored(link: WatchdogLink, spawn: Spawn, bad: list[str]) -> None:
    pid = link.pid
    for line in bad:
        link._send(line)
    service = spawn()
    link.add(service.pid)
    deadline = boottime() + 0.2
    link.deadline(deadline)
    wait_for(lambda: dead(service), deadline + 1.0 - boottime(), "service killed")
    # The same watchdog did it: it neither crashed nor was restarted by the link.
    assert link.pid == pid
    assert alive(watchdog_proc(link))


def test_a_dead_watchdog_is_restarted_with_its_groups_and_deadline(
    link: WatchdogLink, spawn: Spawn
) -> None:
    service = spawn()
    link.add(service.pid)
    old = watchdog_proc(link)
    os.kill(old.pid, signal.SIGKILL)
    old.wait(5)
    assert alive(service), "a killed watchdog does not kill its services"
    deadline = boottime() + 0.2
    link.deadline(deadline)  # notices the exit and starts a new watchdog
    assert link.pid != old.pid
    wait_for(lambda: dead(service), deadline + 1.5 - boottime(), "service killed")


def _spawn_at_pid(pid: int, spawn: Spawn) -> subprocess.Popen[bytes] | None:
    """A new process that the kernel gives exactly ``pid`` (a reused PID), or None.

    ``ns_last_pid`` names the PID given last; other processes on the machine may take
    the next one first, so it is tried a number of times."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(200):
        try:
            last.write_text(str(pid - 1))
        except OSError:
            return None
        proc = spawn()
        if proc.pid == pid:
            return proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    return None


def pidfd_held(holder: int, pid: int) -> bool:
    """Does process ``holder`` hold a pidfd on ``pid``?"""
    for info in Path(f"/proc/{holder}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            if f"Pid:\t{pid}\n" in info.read_text():
                return True
    return False


def test_a_pid_given_to_another_process_is_never_killed(link: WatchdogLink, spawn: Spawn) -> None:
    registered, witness = spawn(), spawn()
    link.add(registered.pid)
    link.add(witness.pid)
    # The watchdog has taken the registration in (it holds a pidfd on the leader) before
    # the leader dies. Until then the PID is the agent's unreaped child: a reuse needs
    # the leader to die, be reaped and its PID come round again within the same clock
    # tick (10 ms), which only a test forcing the next PID can make happen.
    wait_for(lambda: pidfd_held(watchdog_proc(link).pid, registered.pid), 2.0, "pidfd held")
    os.kill(registered.pid, signal.SIGKILL)
    registered.wait(5)  # reaped: the kernel may give its PID to the next process
    stranger = _spawn_at_pid(registered.pid, spawn)
    if stranger is None:
        pytest.skip("cannot choose the next PID here (/proc/sys/kernel/ns_last_pid)")
    assert os.getpgid(stranger.pid) == registered.pid, "same PID, same group id"
    link.deadline(boottime() + 0.1)
    wait_for(lambda: dead(witness), 2.0, "the registered service killed")
    kills_done(link)
    assert alive(stranger), "the watchdog killed a process that only reused a service's PID"


def test_a_registration_with_another_start_time_is_not_killed(
    link: WatchdogLink, spawn: Spawn
) -> None:
    # The PID-reuse guard on its own: the process at this PID is not the one registered.
    stranger, witness = spawn(), spawn()
    start = start_time(stranger.pid)
    assert start is not None
    link._send(f"add {stranger.pid} {start - 1}")
    link.add(witness.pid)
    link.deadline(boottime() + 0.1)
    wait_for(lambda: dead(witness), 2.0, "the registered service killed")
    kills_done(link)
    assert alive(stranger)


def test_a_group_whose_leader_has_exited_is_still_killed(link: WatchdogLink) -> None:
    # The leader forks a child into its group, then exits and is reaped: the group id is
    # still the group's (the kernel gives no process a PID in use as a group id).
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; read _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert leader.stdin is not None and leader.stdout is not None
    child = int(leader.stdout.readline())
    try:
        assert link.add(leader.pid)
        leader.stdin.write(b"\n")
        leader.stdin.close()
        leader.wait(5)
        assert not gone(child)
        link.deadline(boottime() + 0.1)
        wait_for(lambda: gone(child), 2.0, "the child left in the group killed")
    finally:
        leader.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)


def test_the_postmaster_serving_a_registered_data_dir_is_killed(
    link: WatchdogLink, spawn: Spawn, tmp_path: Path
) -> None:
    """Whichever postmaster serves the data directory at the deadline: one restarted in
    place before the agent registered its PID. A stale ``postmaster.pid`` naming a
    process that is no postgres in that directory is left alone."""
    data = tmp_path / "data dir"  # a space, as a site's path may have
    data.mkdir()
    postgres = tmp_path / "postgres"  # the kernel names a process after its program
    shutil.copy("/bin/sleep", postgres)
    server = subprocess.Popen([str(postgres), "60"], cwd=data, start_new_session=True)
    stranger = spawn()
    try:
        (data / "postmaster.pid").write_text(f"{stranger.pid}\n{data}\n")
        link.add_data_dir(data)
        witness = spawn()
        link.add(witness.pid)
        link.deadline(boottime() + 0.1)
        wait_for(lambda: dead(witness), 2.0, "the registered service killed")
        assert alive(server) and alive(stranger), "killed what the data dir does not name"

        (data / "postmaster.pid").write_text(f"{server.pid}\n{data}\n")
        later = boottime() + 0.2
        link.deadline(later)
        wait_for(lambda: dead(server), later + 2.0 - boottime(), "the postmaster killed")
        assert alive(stranger)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(5)


SUSPENDED_S = 1000.0


def test_a_deadline_is_read_on_boottime_as_after_a_suspend(spawn: Spawn) -> None:
    """The watchdog runs in a time namespace whose CLOCK_BOOTTIME is 1000 s ahead of its
    CLOCK_MONOTONIC, as on a machine that was suspended that long since it booted. A
    deadline 0.3 s away on BOOTTIME must fire then; read on the monotonic clock it
    would lie 1000 s ahead."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare (util-linux) here")
    in_namespace = [unshare, "--time", "--boottime", str(int(SUSPENDED_S)), "--fork"]
    probe = subprocess.run([*in_namespace, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a time namespace here: {probe.stderr.decode().strip()}")
    service = spawn()
    watchdog = subprocess.Popen(
        [*in_namespace, sys.executable, "-m", "hapair.workshop_agent.watchdog"],
        stdin=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    assert watchdog.stdin is not None
    try:
        start = start_time(service.pid)
        assert start is not None
        # Start times in /proc are shifted by the namespace's offset too (in clock ticks):
        # an agent and its watchdog always share their time namespace.
        start += int(SUSPENDED_S) * os.sysconf("SC_CLK_TCK")
        deadline = boottime() + SUSPENDED_S + 0.3  # the namespace's BOOTTIME
        watchdog.stdin.write(f"add {service.pid} {start}\ndeadline {deadline!r}\n".encode())
        watchdog.stdin.flush()
        wait_for(lambda: dead(service), 5.0, "service killed at its BOOTTIME deadline")
        assert boottime() + SUSPENDED_S >= deadline
    finally:
        watchdog.stdin.close()
        watchdog.wait(5)


@pytest.mark.parametrize("unconfirmed", [False, True], ids=["confirmed", "vip-unconfirmed"])
async def test_the_lease_is_revoked_on_end_of_file_only_once_everything_is_confirmed(
    etcd: Etcd, store: Store, spawn: Spawn, monkeypatch: pytest.MonkeyPatch, unconfirmed: bool
) -> None:
    """Real etcd, the lease of a key: the watchdog revokes it once its agent's pipe has
    closed and the killed service is seen dead. A virtual address it cannot confirm off
    its interface (an interface that ``ip`` does not know) leaves the lease alone: it
    will expire."""
    monkeypatch.chdir(ROOT)
    lease = await store.grant(30)
    await store.put("/hapair/v1/test/held", b"x", lease=lease)
    link = WatchdogLink((), etcd.url, etcd.tls)
    service = spawn()
    link.add(service.pid)
    if unconfirmed:
        link.add_vip("10.255.255.1/32", "hp-no-such-if")
    link.lease(lease)
    link.deadline(boottime() + 60)
    proc = watchdog_proc(link)
    link._send("lease -")  # what close() would send: the agent revoked its lease itself
    link._send(f"lease {lease:x}")  # here it did not: it died
    assert proc.stdin is not None
    proc.stdin.close()  # end of file, as when the agent dies
    try:
        await asyncio.to_thread(wait_for, lambda: dead(proc), 5.0, "watchdog exited")
    finally:
        link.close()
    assert dead(service)
    held = await store.get("/hapair/v1/test/held")
    if unconfirmed:
        assert held is not None, "revoked although the address was not confirmed removed"
        await store.revoke(lease)
    else:
        assert held is None, "the lease was not revoked"
