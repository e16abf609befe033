"""Service supervision: start, watch, restart and stop the pair's service processes.

Each service runs in its own cgroup where cgroup v2 can be used (``cgroups.py``: a
stop or a fence reaches every process it started, even one that left its process group)
and in its own process group, under ``setpriv --pdeathsig KILL`` (so it dies with the
agent); active-only services are registered with the watchdog. Each runs as the user
the site file or the node names, never as root unless the node allows it, with an
environment of its own (``run_as.py``); one refused is not started. A service is
restarted in place within its budget; a critical one, or one whose budget is spent,
becomes the node's ``failure``, which the decision turns into a resignation.

Nothing is started unless ``may_run()`` says the lease and the term are still good, and
the check is made again in the very step that forks; the child itself (``exec_guard.py``)
refuses to run the service's program once the fence point it was given has passed, so
a freeze anywhere between the decision and the ``exec`` cannot start a service late.
The processes of one run are forked and stopped by ``service_process.py``; this module
decides when, and watches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from hapair.shared.clock import boottime
from hapair.shared.log import EventLog
from hapair.shared.package import PLACEHOLDER as PACKAGE_DIR
from hapair.shared.records import ServiceState, ServiceStatus
from hapair.shared.topology import Health, Node, Pair, Service, expand, placeholder_values
from hapair.shared.waits import cancelled, wait_event
from hapair.workshop_agent.cgroups import CgroupTree
from hapair.workshop_agent.exec_guard import REFUSED
from hapair.workshop_agent.health import probe
from hapair.workshop_agent.restart_budget import RestartBudget
from hapair.workshop_agent.run_as import (
    NO_ROOT,
    ServiceRefused,
    ServiceUsers,
    service_env,
)
from hapair.workshop_agent.service_process import Runner, ServiceProcesses
from hapair.workshop_agent.watchdog import WatchdogLink

READY_POLL_S = 0.02
PACKAGE_POLL_S = 0.5
STEADY_S = 1.0
"""A copy restarted on another package version counts as up once it has run (healthy,
where it has a health check) this long: a program that exits at once is not up."""
RESTART_LIMIT_S = 10.0
"""Beyond its health check's start period, how long a restarted copy has to be up."""


def restarts_for(old: Service, new: Service | None) -> bool:
    """Whether a topology change stops a running copy of ``old``: it left, or changed in
    anything but its ``package:``. A new version is only installed beside the running
    one; the copy moves to it when it next starts (a rollout restarts it)."""
    return new is None or old.model_copy(update={"package": None}) != new.model_copy(
        update={"package": None}
    )


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(
        self,
        pair: Pair,
        node: Node,
        log: EventLog,
        watchdog: WatchdogLink,
        may_run: Callable[[], bool],
        paused: Callable[[], bool],
        on_change: Callable[[], None],
        state_dir: Path,
        env: dict[str, str],
        clock: Callable[[], float] = boottime,
        run_until: Callable[[], float] = lambda: float("inf"),
        users: ServiceUsers = NO_ROOT,
        event: Callable[..., None] = lambda kind, reason, **details: None,
        package_dir: Callable[[Service], Path | None] = lambda spec: None,
        installed_dir: Callable[[str, str], Path | None] = lambda service, version: None,
    ) -> None:
        """``run_until()``: the fence point (on ``clock``) before which an active-only
        service may start its program; a past time when it may not start now. ``env``:
        the ``HAPAIR_*`` variables every service gets; ``users``: this node's rules on
        whom services run as; ``event(kind, reason, **details)`` files an event;
        ``package_dir(spec)`` the installed directory of the package ``spec`` names (or
        the newest held); ``installed_dir(service, version)`` the directory of one
        installed version of a service's package, None if it is not installed here."""
        self.pair, self.node = pair, node
        self.log = log
        self.watchdog = watchdog
        self.may_run = may_run
        self.paused = paused
        self.on_change = on_change
        self.env = env
        self.users = users
        self.event = event
        self.package_dir = package_dir
        self.installed_dir = installed_dir
        # service: (the version it runs from its next start on, the version the site
        # named when that was asked); ended once the site names another version.
        self.pins: dict[str, tuple[str, str]] = {}
        self._restarting: set[str] = set()
        self.clock = clock
        self.processes = ServiceProcesses(node.name, log, watchdog, state_dir, clock, run_until)
        self.epoch: int | None = None
        self.failure: str | None = None
        self.runners: dict[str, Runner] = {}
        self.held: set[str] = set()
        self._updating = False
        self._activation: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._sync_runners(pair)

    @property
    def cgroups(self) -> CgroupTree | None:
        """The services' cgroup tree; None where cgroup v2 cannot be used."""
        return self.processes.cgroups

    # -- views ------------------------------------------------------------------------
    def active_up(self) -> bool:
        """Active-only services are running, starting, or held for this term."""
        held = self.epoch is not None and bool(self.held)
        started = self.epoch is not None and self._activation is not None
        return (
            held
            or started
            or (self._activation is not None and not self._activation.done())
            or any(r.alive() for r in self.runners.values() if r.active_only)
        )

    def healthy(self) -> tuple[bool, list[str]]:
        """A node is healthy when every service that runs on every node is running."""
        problems = [
            f"{r.spec.name}: {r.state}" + (f" ({r.detail})" if r.detail else "")
            for r in self.runners.values()
            if not r.active_only and r.state not in ("running", "unhealthy")
        ]
        return not problems, problems

    def running_with_endpoint(self) -> list[Service]:
        return [
            r.spec
            for r in self.runners.values()
            if r.spec.endpoint is not None
            and r.state in ("running", "unhealthy")
            and (not r.active_only or self.epoch is not None)
        ]

    def statuses(self) -> list[ServiceStatus]:
        return [
            ServiceStatus(
                name=r.spec.name,
                placement=r.spec.placement,
                state=r.state,
                restarts=r.restarts,
                pid=r.proc.pid if r.proc else None,
                detail=r.detail,
                package=r.version,
            )
            for r in self.runners.values()
        ]

    # -- lifecycle --------------------------------------------------------------------
    def _sync_runners(self, pair: Pair) -> None:
        self.pair = pair
        for spec in pair.services:
            old = self.runners.get(spec.name)
            if old is None:
                self.runners[spec.name] = Runner(
                    spec, RestartBudget(spec.restart.max_restarts, spec.restart.window_s)
                )
            else:
                old.spec = spec
        for name in set(self.runners) - {s.name for s in pair.services}:
            del self.runners[name]

    async def update(self, pair: Pair, node: Node) -> None:
        """Reconcile with a new topology: stop removed or changed services, start the rest."""
        new = {s.name: s for s in pair.services}
        changed = [
            r
            for name, r in self.runners.items()
            if restarts_for(r.spec, new.get(name)) or node != self.node
        ]
        # No start while the specs change: a start now would use the old spec.
        self._updating = True
        try:
            await self._cancel_activation()
            for r in changed:
                await self._stop(r, r.spec.stop_grace_s)
            self.node = node
            self._sync_runners(pair)
        finally:
            self._updating = False
        self.start_shared()
        if self.epoch is not None:
            self.activate(self.epoch)
        self.on_change()

    def start_shared(self) -> None:
        for r in self.runners.values():
            if not r.active_only and not r.alive() and r.spec.name not in self._restarting:
                r.task = asyncio.create_task(self._run(r, None))

    def activate(self, epoch: int, held: frozenset[str] = frozenset()) -> None:
        """Start the active-only services in order (each waits for the previous one),
        except those ``held`` until an operator acknowledges the recovery."""
        if self._updating or (self._activation is not None and not self._activation.done()):
            return
        if self.epoch != epoch:
            self.held = set(held)
        self.epoch = epoch
        self.failure = None
        self._activation = asyncio.create_task(self._start_in_order(epoch))

    def release(self, names: set[str]) -> None:
        """Start held services now (the recovery was acknowledged)."""
        self.held -= names
        if self.epoch is not None:
            self._activation = None
            self.activate(self.epoch)

    async def _start_in_order(self, epoch: int) -> None:
        for r in [r for r in self.runners.values() if r.active_only]:
            if r.spec.name in self.held:
                self._set_state(r, "held", "awaiting operator acknowledgement")
                continue
            if r.alive():
                continue
            if not self.may_run() or self.epoch != epoch:
                return
            r.ready.clear()
            r.budget.times.clear()
            r.task = asyncio.create_task(self._run(r, epoch))
            limit = r.spec.health.start_period_s if r.spec.health else 5.0
            await wait_event(r.ready, limit)

    async def deactivate(self) -> None:
        """Planned stop of the active-only services, last started first."""
        self.epoch = None
        self.held.clear()
        await self._cancel_activation()
        for r in reversed([r for r in self.runners.values() if r.active_only]):
            await self._stop(r, r.spec.stop_grace_s)
        # A failure belongs to the term it ended: kept, it would make this node resign
        # its next term at once, before that term's services even started.
        self.failure = None
        self.on_change()

    def kill_active(self, grace: float) -> None:
        """Fence: signal every active-only service now, SIGKILL after ``grace``.

        Synchronous on purpose: it runs from a timer even while the loop is busy."""
        self.epoch = None
        self.held.clear()
        self.failure = None  # as in deactivate: it belonged to the term now fenced
        if self._activation is not None:
            self._activation.cancel()
        for r in self.runners.values():
            if not r.active_only or not r.alive():
                continue
            if r.task is not None:
                r.task.cancel()
            signalled = self.processes.fence(r, grace)
            cleanup = asyncio.create_task(self._stop(r, grace, signalled))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
        for r in self.runners.values():
            if r.state == "held":
                r.state, r.detail = "stopped", None
        self.on_change()

    async def stop_all(self) -> None:
        await self.deactivate()
        for r in self.runners.values():
            await self._stop(r, r.spec.stop_grace_s)
        self.processes.close()

    async def _cancel_activation(self) -> None:
        for err in await cancelled(self._activation):
            self.log.exception("starting the active services failed", err)
        self._activation = None

    async def _stop(
        self, r: Runner, grace: float, signalled: asyncio.subprocess.Process | None = None
    ) -> None:
        for err in await cancelled(r.task):
            self.log.exception("service runner failed", err, service=r.spec.name)
        r.task = None
        await self.processes.terminate(r, grace, signalled)
        r.state, r.detail, r.version = "stopped", None, None
        r.ready.set()

    # -- package versions -------------------------------------------------------------
    def version_dir(self, spec: Service) -> Path | None:
        """Where a start of ``spec`` takes its program from: the version it was pinned
        to (a rollout's, or the one a rollout rolled back to) while the site names the
        version it named then; else the declared version once installed (the newest
        held until then)."""
        pin = self.pins.get(spec.name)
        if pin is not None and spec.package is not None and pin[1] == spec.package.dir_name:
            pinned = self.installed_dir(spec.name, pin[0])
            if pinned is not None:
                return pinned
        return self.package_dir(spec)

    def pin(self, versions: Mapping[str, str]) -> None:
        """Run these services on these versions from their next start on."""
        for name, version in versions.items():
            r = self.runners.get(name)
            if r is not None and r.spec.package is not None:
                self.pins[name] = (version, r.spec.package.dir_name)

    async def restart_copies(self, names: Iterable[str]) -> dict[str, str | None]:
        """Restart, one after the other, the ``placement: all`` copies among ``names``
        whose run is not from the version :meth:`version_dir` gives; each must be up
        (:data:`STEADY_S`) before the next. Per service: None once up on it, else why
        not. Active-only services are never restarted here: they start on that version
        when this node next becomes active."""
        outcomes: dict[str, str | None] = {}
        for name in names:
            r = self.runners.get(name)
            want = self.version_dir(r.spec) if r is not None else None
            if r is None or r.active_only or r.spec.package is None:
                outcomes[name] = "not a placement: all service from a package here"
            elif want is None:
                outcomes[name] = "no version of its package is installed here"
            elif r.version == want.name and r.state == "running":
                outcomes[name] = None
            else:
                outcomes[name] = await self._restart_on(r, want.name)
        return outcomes

    async def _restart_on(self, r: Runner, version: str) -> str | None:
        self.log.info(
            "service restarting on another package version",
            service=r.spec.name,
            version=version,
            was=r.version,
        )
        self._restarting.add(r.spec.name)
        try:
            await self._stop(r, r.spec.stop_grace_s)
            r.budget.times.clear()
            self._set_state(r, "starting", None)
            r.task = asyncio.create_task(self._run(r, None))
        finally:
            self._restarting.discard(r.spec.name)
        self.on_change()
        start = r.spec.health.start_period_s if r.spec.health else 0.0
        limit = start + RESTART_LIMIT_S
        deadline = self.clock() + limit
        up_since: float | None = None
        while self.clock() < deadline:
            if r.state in ("restarting", "failed", "stopped"):
                return r.detail or r.state
            if r.state == "running" and r.version == version:
                up_since = self.clock() if up_since is None else up_since
                if self.clock() - up_since >= STEADY_S:
                    return None
            else:
                up_since = None
            await asyncio.sleep(READY_POLL_S)
        return f"not up on {version} within {limit:g} s ({r.state}: {r.detail or 'no detail'})"

    # -- one service ------------------------------------------------------------------
    async def _run(self, r: Runner, epoch: int | None) -> None:
        while True:
            if r.active_only and (not self.may_run() or self.epoch != epoch):
                r.state = "stopped"
                r.ready.set()
                self.on_change()
                return
            if r.spec.package is not None and self.version_dir(r.spec) is None:
                # The first version is on its way (packages.py): nothing to run yet, and
                # no failure either.
                self._set_state(r, "starting", "waiting for its package to be installed")
                await asyncio.sleep(PACKAGE_POLL_S)
                continue
            try:
                r.run_as = self.users.resolve(r.spec)
            except ServiceRefused as refused:
                self._refuse(r, str(refused))
                return
            r.state = "starting"
            self.on_change()
            outcome = await self._spawn_and_watch(r, epoch)
            await self.processes.terminate(r, min(r.spec.stop_grace_s, 2.0))
            r.version = None
            if outcome is None:
                # The fence point the fork was given passed before the program could
                # start (a slow exec, a late keepalive answer), but the lease may have
                # been confirmed since: the loop's first check tells whether the term
                # goes on, and starts the service again in it if so.
                self.log.warning(
                    "service not started before the fence point it was forked with",
                    service=r.spec.name,
                )
                if r.active_only:
                    continue
                r.state = "stopped"
                r.ready.set()
                self.on_change()
                return
            r.detail = outcome
            self.log.warning(
                "service failed", service=r.spec.name, reason=outcome, restarts=r.restarts
            )
            backoff = self._restart_backoff(r)
            if backoff is None:
                r.state = "failed"
                if r.active_only or self.epoch is not None:
                    kind = "critical service" if r.spec.critical else "service"
                    self.failure = f"{kind} {r.spec.name} {outcome}"
                r.ready.set()
                self.on_change()
                return
            r.restarts += 1
            r.state = "restarting"
            self.on_change()
            await asyncio.sleep(backoff)

    def _refuse(self, r: Runner, reason: str) -> None:
        """Not started, nor tried again: only this node's settings or the site file can
        change who it would run as. Not the node's failure either: no other node is
        asked to run it as someone this one refused."""
        self.log.warning("service refused", service=r.spec.name, reason=reason)
        self.event("service refused", reason, service=r.spec.name)
        r.state, r.detail = "failed", reason
        r.ready.set()
        self.on_change()

    def _restart_backoff(self, r: Runner) -> float | None:
        """Seconds to wait before a restart, or None: this failure moves the pair."""
        base = r.spec.restart.backoff_s
        on_active = r.active_only or self.epoch is not None
        if on_active and self.paused():
            return max(base, 1.0)  # paused: never move the pair, keep trying in place
        if on_active and r.spec.critical:
            return None
        if r.budget.allow(self.clock()):
            return base
        # A standby cannot resign; it keeps trying, slowly, and reports itself unhealthy.
        return None if on_active else max(base, 5.0)

    async def _spawn_and_watch(self, r: Runner, epoch: int | None) -> str | None:
        """How the run ended; None if it did not start because its term had ended."""
        values = placeholder_values(self.pair, self.node, epoch)
        if r.spec.package is not None:
            installed = self.version_dir(r.spec)
            if installed is None:
                return "could not start: no version of its package installed here yet"
            values[PACKAGE_DIR] = str(installed)
            r.version = installed.name
        argv = [expand(a, values) for a in r.spec.command]
        run_as = r.run_as
        assert run_as is not None  # resolved by _run before every start
        hapair = {
            **self.env,
            "HAPAIR_SERVICE": r.spec.name,
            "HAPAIR_EPOCH": "" if epoch is None else str(epoch),
        }
        declared = {k: expand(v, values) for k, v in r.spec.env.items()}
        r.env = env = service_env(run_as, hapair, declared)
        # Found on the service's own PATH, as its shell would.
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
        if exe is None or not os.access(exe, os.X_OK):
            return f"could not start: command not found: {argv[0]}"
        cwd = expand(r.spec.cwd, values) if r.spec.cwd else None
        # A task of its own, shielded: a cancel (fence, stop) must never lose the handle
        # of a process already forked; terminate waits for it.
        forking = self.processes.fork(
            r, [exe, *argv[1:]], run_as, env, cwd, in_term=lambda: self.epoch == epoch
        )
        r.spawning = asyncio.create_task(forking)
        try:
            until = await asyncio.shield(r.spawning)
        except OSError as err:
            return f"could not start: {err}"
        if until is None:
            return None
        proc = r.proc
        assert proc is not None
        outcome = await self._watch(r, proc, values)
        if proc.returncode == REFUSED and not self.clock() < until:
            return None  # the guard refused: the fence point passed before the exec
        return outcome

    async def _watch(
        self, r: Runner, proc: asyncio.subprocess.Process, values: dict[str, str]
    ) -> str:
        exited = asyncio.ensure_future(proc.wait())
        health = r.spec.health
        if health is None:
            self._set_state(r, "running", None)
            return _describe_exit(await exited)
        deadline = self.clock() + health.start_period_s
        while True:
            problem = await self._race(exited, self._probe(r, health, values))
            if exited.done():
                return _describe_exit(exited.result())
            if problem is None:
                break
            if self.clock() > deadline:
                return f"not ready within {health.start_period_s}s: {problem}"
            await asyncio.wait([exited], timeout=READY_POLL_S)
        self._set_state(r, "running", None)
        failures = 0
        while True:
            await asyncio.wait([exited], timeout=health.interval_s)
            if exited.done():
                return _describe_exit(exited.result())
            problem = await self._race(exited, self._probe(r, health, values))
            if exited.done():
                return _describe_exit(exited.result())
            if problem is None:
                failures = 0
                if r.state != "running":
                    self._set_state(r, "running", None)
                continue
            failures += 1
            self._set_state(r, "unhealthy", problem)
            if failures >= health.failures:
                return f"failed {failures} health checks: {problem}"

    async def _race(self, exited: asyncio.Future[int], check: Awaitable[str | None]) -> str | None:
        """Run a probe, but give up on it the moment the process exits."""
        task = asyncio.ensure_future(check)
        await asyncio.wait([exited, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if not task.done():
            await cancelled(task)  # the exit says it all, whatever the probe was at
            return "process exited"
        return task.result()

    async def _probe(self, r: Runner, health: Health, values: dict[str, str]) -> str | None:
        assert r.run_as is not None  # resolved before the run started
        return await probe(health, values, r.run_as, r.env)

    def _set_state(self, r: Runner, state: ServiceState, detail: str | None) -> None:
        if r.state != state:
            self.log.info("service " + state, service=r.spec.name, detail=detail)
        r.state, r.detail = state, detail
        if state == "running":
            r.ready.set()
        self.on_change()
