"""The processes of one service run: forked behind the exec guard into a cgroup and a
process group of their own, as the service's user, and stopped with everything they
started.

The supervisor decides when a service runs; this module holds what must be exact about
its processes whatever was decided: the last checks of the term in the step that forks,
the watchdog told of a run before its program may start, one SIGTERM per process on a
stop, and a record in the log of when each run began and ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hapair.shared.log import EventLog
from hapair.shared.records import ServiceState
from hapair.shared.topology import Service
from hapair.workshop_agent import cgroups
from hapair.workshop_agent.cgroups import CgroupTree
from hapair.workshop_agent.restart_budget import RestartBudget
from hapair.workshop_agent.run_as import RunAs
from hapair.workshop_agent.watchdog import WatchdogLink

SETPRIV = shutil.which("setpriv")
EXEC_GUARD = str(Path(__file__).with_name("exec_guard.py"))
LOG_DIR_MODE, LOG_MODE = 0o750, 0o640  # the services' output: for the agent's user and group
CGROUP_EMPTY_S = 2.0  # bound on waiting for a killed cgroup to empty before removing it
# Test hooks, off unless set in the agent's environment: the agent stops itself (SIGSTOP)
# once, in the step that forks this active-only service, after it decided to start it
# (before the fork), right after the fork (before anything else knows the process) or
# once it let the program run (the watchdog alone stops it then).
STOP_AT = {
    "before fork": os.environ.get("HAPAIR_TEST_STOP_BEFORE_FORK"),
    "after fork": os.environ.get("HAPAIR_TEST_STOP_AFTER_FORK"),
    "after start": os.environ.get("HAPAIR_TEST_STOP_AFTER_START"),
}
# Test hook, off unless set: the forked child of this active-only service is stopped
# (SIGSTOP), once, before its exec guard checks the fence point it was given.
STOP_GUARD = os.environ.get("HAPAIR_TEST_STOP_GUARD")


@dataclass(eq=False)
class Runner:
    """One service under supervision: its spec, its restart budget, its state, and the
    process, cgroup and tasks of its current run."""

    spec: Service
    budget: RestartBudget
    state: ServiceState = "stopped"
    restarts: int = 0
    detail: str | None = None
    proc: asyncio.subprocess.Process | None = None
    cgroup: Path | None = None
    task: asyncio.Task[None] | None = None
    spawning: asyncio.Task[float | None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Who the current run and its health checks run as, and with what environment.
    run_as: RunAs | None = None
    env: dict[str, str] = field(default_factory=dict)
    # The package version (``{version}-{sha256[:12]}``) the current run's program is from.
    version: str | None = None

    @property
    def active_only(self) -> bool:
        return self.spec.placement == "active"

    def alive(self) -> bool:
        task_alive = any(t is not None and not t.done() for t in (self.task, self.spawning))
        return task_alive or (self.proc is not None and self.proc.returncode is None)


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ServiceProcesses:
    """Forks and stops the runs of one node's services."""

    def __init__(
        self,
        node_name: str,
        log: EventLog,
        watchdog: WatchdogLink,
        state_dir: Path,
        clock: Callable[[], float],
        run_until: Callable[[], float],
    ) -> None:
        self.log = log
        self.watchdog = watchdog
        self.clock = clock
        self.run_until = run_until
        self.cgroups, why = CgroupTree.create(node_name)
        if self.cgroups is not None:
            watchdog.add_tree(self.cgroups.root)
        else:
            self.log.warning(
                "services fenced by process group only: a service that leaves its group "
                "survives a fence",
                reason=why,
            )
        self._stopped_at: set[str] = set()  # the test hooks that have fired
        self.log_dir = state_dir / "logs"
        self.log_dir.mkdir(mode=LOG_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.log_dir, LOG_DIR_MODE)  # the umask aside, and an older one too

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()

    async def fork(
        self,
        r: Runner,
        argv: list[str],
        run_as: RunAs,
        env: dict[str, str],
        cwd: str | None,
        in_term: Callable[[], bool],
    ) -> float | None:
        """Fork the service; the fence point its program must start before, or None if
        the term has ended (``in_term()`` false or the fence point passed: nothing forked,
        or the child told never to run its program). The child becomes ``run_as`` after
        it joined the cgroup, with ``env`` as its whole environment."""
        self._stop_for_test(r, "before fork")
        # Checked again in the step that forks: the check that led here may be old.
        until = float("inf")
        if r.active_only:
            until = self.run_until()
            if not in_term() or not self.clock() < until:
                return None
        r.cgroup = self.cgroups.new_run(r.spec.name) if self.cgroups is not None else None
        if r.cgroup is not None and r.active_only:
            self.watchdog.add_cgroup(r.cgroup)  # before anything can run in it
        prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
        # The child waits on this pipe before its program runs, until the watchdog knows
        # its process group; end of file (this agent died, or the term ended) and it never
        # runs. Frozen right after the fork, this agent leaves no service the watchdog
        # cannot kill.
        go_read, go = os.pipe()
        forked = False
        try:
            guard = [
                *(sys.executable, "-I", "-S", EXEC_GUARD, repr(until)),
                *(str(r.cgroup or "-"), str(go_read), run_as.guard_arg(), "--"),
            ]
            forked_at = self.clock()  # no process of this run can exist before
            with self._open_log(r.spec.name) as logfile:
                r.proc = await asyncio.create_subprocess_exec(
                    *prefix,
                    *guard,
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    pass_fds=(go_read,),
                )
            forked = True
            os.close(go_read)
            # Logged in the step that forks (a cancel cannot come between): the record of
            # every process this node ever started for a service, and from when.
            self.log.info(
                "service started",
                service=r.spec.name,
                pid=r.proc.pid,
                user=run_as.name,
                at=repr(forked_at),
                cgroup=r.cgroup,
            )
            self._stop_for_test(r, "after fork")
            if r.active_only and r.spec.name == STOP_GUARD and "guard" not in self._stopped_at:
                self._stopped_at.add("guard")
                os.kill(r.proc.pid, signal.SIGSTOP)
            if r.active_only:
                # Written into the watchdog's pipe before the child may go on: the
                # watchdog reads it whatever this agent does next, and kills the group
                # at once if its deadline has passed meanwhile.
                self.watchdog.add(r.proc.pid)
                # Checked again: a freeze since the check above may have ended the term.
                # The point may have moved on meanwhile (a term beat moves it every few
                # tens of milliseconds): the child checks against the newest one, which
                # it reads from this pipe.
                until = self.run_until()
                if not in_term() or not self.clock() < until:
                    return None
            with contextlib.suppress(BrokenPipeError):  # the child is gone already
                os.write(go, repr(until).encode())
            self._stop_for_test(r, "after start")
        finally:
            if not forked:
                os.close(go_read)
            os.close(go)
        return until

    def _open_log(self, service: str) -> io.BufferedWriter:
        """The service's log, appended to, readable by the agent's user and group only."""
        fd = os.open(
            self.log_dir / f"{service}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE
        )
        try:
            os.fchmod(fd, LOG_MODE)  # the umask aside, and a file from before too
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "ab")

    def _stop_for_test(self, r: Runner, point: str) -> None:
        """The test hooks above (``STOP_AT``): stop this agent at ``point``, once."""
        if r.active_only and STOP_AT[point] == r.spec.name and point not in self._stopped_at:
            self._stopped_at.add(point)
            os.kill(os.getpid(), signal.SIGSTOP)

    def fence(self, r: Runner, grace: float) -> asyncio.subprocess.Process | None:
        """Signal the run's processes now, SIGKILL after ``grace``; the process signalled,
        which ``terminate`` must not signal again.

        Synchronous on purpose: the fence runs from a timer even while the loop is busy."""
        loop = asyncio.get_running_loop()
        signalled = None
        if r.proc is not None and r.proc.returncode is None:
            signalled = r.proc
            _killpg(signalled.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            loop.call_later(grace, _killpg, signalled.pid, signal.SIGKILL)
        if r.cgroup is not None:
            group = signalled.pid if signalled is not None else None
            cgroups.signal_all(r.cgroup, signal.SIGTERM, signalled_group=group)
            loop.call_later(grace, cgroups.kill, r.cgroup)
        return signalled

    async def terminate(
        self, r: Runner, grace: float, signalled: asyncio.subprocess.Process | None = None
    ) -> None:
        """Stop the run: SIGTERM (unless the fence already sent it to this very
        process), SIGKILL after ``grace``, then whatever is left in its group and cgroup."""
        if r.spawning is not None:
            # A fork in flight finishes first, so its process is known and stopped too.
            await asyncio.wait([r.spawning])
            r.spawning = None
        proc, cgroup = r.proc, r.cgroup
        if proc is not None and proc.returncode is None:
            if proc is not signalled:
                _killpg(proc.pid, signal.SIGTERM)
                if cgroup is not None:
                    cgroups.signal_all(cgroup, signal.SIGTERM, signalled_group=proc.pid)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
            except TimeoutError:
                _killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # The leader of the group is gone; nothing it started may outlive it.
        if proc is not None:
            _killpg(proc.pid, signal.SIGKILL)
            if r.active_only:
                self.watchdog.remove(proc.pid)
            r.proc = None
        emptied = None
        if cgroup is not None:
            cgroups.kill(cgroup)
            if await self._remove_cgroup(cgroup):
                emptied = cgroup
                if r.active_only:
                    self.watchdog.remove_cgroup(cgroup)
            r.cgroup = None
        if proc is not None:
            # The record of when this run was over: its leader reaped, and its cgroup
            # (named only if it was seen empty) with everything the service started.
            self.log.info(
                "service ended",
                service=r.spec.name,
                pid=proc.pid,
                at=repr(self.clock()),
                cgroup=emptied,
            )

    async def _remove_cgroup(self, cgroup: Path) -> bool:
        """Remove a killed run's cgroup once its processes are gone (bounded)."""
        deadline = self.clock() + CGROUP_EMPTY_S
        # The kernel tells no one when a cgroup empties but through cgroup.events: poll.
        while cgroups.populated(cgroup) and self.clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if cgroups.remove(cgroup):
            return True
        self.log.warning("service cgroup not empty after a kill", cgroup=str(cgroup))
        return False
