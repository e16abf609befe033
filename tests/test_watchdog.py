"""The watchdog process: real processes, real deadlines on the shared monotonic clock.

Each test starts ``python -m workshop_agent.watchdog`` through ``WatchdogLink`` and
``sleep 60`` services in their own sessions (process group id = pid), then watches
what the watchdog does to them. Every process is stopped by its pid in a finally.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import ROOT, wait_for

from workshop_agent.watchdog import WatchdogLink

Spawn = Callable[[], subprocess.Popen[bytes]]


def alive(proc: subprocess.Popen[bytes]) -> bool:
    """True while the process runs; reaps it (no zombie) once it has died."""
    return proc.poll() is None


def dead(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def wait_until(at: float) -> None:
    """Block until the monotonic clock reaches ``at`` (the watchdog's own clock)."""
    while (left := at - time.monotonic()) > 0:
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
    monkeypatch.chdir(ROOT)  # the watchdog runs as ``python -m workshop_agent.watchdog``
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
    deadline = time.monotonic() + 0.3
    link.deadline(deadline)

    wait_until(deadline - 0.1)
    assert alive(service), "killed before its deadline"
    wait_for(lambda: dead(service), deadline + 1.0 - time.monotonic(), "service killed")
    assert time.monotonic() >= deadline
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
        link.deadline(time.monotonic() + 0.1)
        wait_for(lambda: dead(service), 2.0, "group leader killed")

        # The grandchild was reparented to init, which may take its time to reap it.
        wait_for(lambda: gone(child_pid), 1.0, "grandchild killed")
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
        service.wait(5)
        if service.stdout is not None:
            service.stdout.close()


def test_extending_the_deadline_in_time_keeps_the_service(link: WatchdogLink, spawn: Spawn) -> None:
    service = spawn()
    link.add(service.pid)
    last = time.monotonic() + 0.4
    link.deadline(last)
    keep_until = time.monotonic() + 0.6
    # Extend every 0.1 s, as the agent does on each keepalive, each time while the
    # deadline is still 0.3 s away.
    while time.monotonic() < keep_until:
        wait_until(last - 0.3)
        assert alive(service), "killed although the deadline was extended in time"
        last = time.monotonic() + 0.4
        link.deadline(last)
    assert alive(service)
    # Stop extending: now the last deadline applies.
    wait_until(last - 0.1)
    assert alive(service)
    wait_for(lambda: dead(service), last + 1.0 - time.monotonic(), "service killed")
    assert time.monotonic() >= last


def test_an_infinite_deadline_disarms(link: WatchdogLink, spawn: Spawn) -> None:
    service = spawn()
    link.add(service.pid)
    soon = time.monotonic() + 0.2
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
    link.deadline(time.monotonic() + 60)
    proc = watchdog_proc(link)
    started = time.monotonic()
    link.close()  # end of file, as when the agent dies
    wait_for(lambda: all(dead(s) for s in services), 1.0, "services killed on end of file")
    wait_for(lambda: dead(proc), 1.0, "watchdog exited")
    assert proc.returncode == 0
    assert time.monotonic() - started < 2.0


def test_a_killed_agent_closes_the_pipe_and_its_services_die(spawn: Spawn) -> None:
    # The agent itself is killed with SIGKILL: the kernel closes its end of the pipe.
    service = spawn()
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from workshop_agent.watchdog import WatchdogLink\n"
            "link = WatchdogLink()\n"
            f"link.add({service.pid})\n"
            "link.deadline(time.monotonic() + 60)\n"
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
    link.deadline(time.monotonic() + 0.1)
    wait_for(lambda: dead(kept), 2.0, "registered service killed")
    # Closing would kill whatever is still registered; once the watchdog has exited every
    # kill it will ever make is done.
    proc = watchdog_proc(link)
    link.close()
    wait_for(lambda: dead(proc), 2.0, "watchdog exited")
    assert alive(released)


def test_a_group_killed_at_a_deadline_is_forgotten(link: WatchdogLink, spawn: Spawn) -> None:
    first = spawn()
    link.add(first.pid)
    link.deadline(time.monotonic() + 0.1)
    wait_for(lambda: dead(first), 2.0, "first service killed")
    # After acting the watchdog is disarmed until a new deadline comes.
    second = spawn()
    link.add(second.pid)
    later = time.monotonic() + 0.3
    link.deadline(later)
    wait_until(later - 0.1)
    assert alive(second)
    wait_for(lambda: dead(second), later + 1.0 - time.monotonic(), "second service killed")


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
    deadline = time.monotonic() + 0.2
    link.deadline(deadline)
    wait_for(lambda: dead(service), deadline + 1.0 - time.monotonic(), "service killed")
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
    deadline = time.monotonic() + 0.2
    link.deadline(deadline)  # notices the exit and starts a new watchdog
    assert link.pid != old.pid
    wait_for(lambda: dead(service), deadline + 1.5 - time.monotonic(), "service killed")
