"""One PLC's poll loop: fixed-rate cycles, path switching, freshness, writes.

Cycles run on a fixed grid (``phase + k * poll_interval_s``) so that PLCs with
different phases never fire on the same tick; a cycle that overruns skips the slots it
missed instead of bunching up. A cycle that fails on the path in use tries the other
path at once. A value stays good only until ``poll_interval_s + timeout_s`` after the
read that confirmed it: a timer turns it stale then if no newer read came, whatever
the reason, and so does a client's read that comes first (after a stall of the
process, the timer's turn may come after the reads queued meanwhile).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hapair.comm_server.codec import Value
from hapair.comm_server.driver import Driver, PathError, WriteError
from hapair.comm_server.paths import PathSwitch
from hapair.comm_server.tags import TagTable
from hapair.comm_server.uatypes import S
from hapair.shared.log import EventLog
from hapair.shared.plcs import ModbusPlc, OpcUaPlc, PlcHealth

PlcConfig = ModbusPlc | OpcUaPlc


LATE_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Upper bounds of the poll lateness histogram (seconds after its slot a cycle began)."""


@dataclass
class PollStats:
    """Shared by every poller; the benchmarks read it."""

    cycles: int = 0
    tags: int = 0
    overruns: int = 0
    record: bool = False
    lateness: list[float] = field(default_factory=list)  # start, after its slot (s)
    duration: list[float] = field(default_factory=list)  # slot to end of cycle (s)
    # Every cycle's lateness, counted by bucket (cumulative counts at scrape time).
    late_counts: list[int] = field(default_factory=lambda: [0] * (len(LATE_BUCKETS_S) + 1))
    late_sum_s: float = 0.0


class PlcPoller:
    """Polls one PLC for ever, keeps its tag table and path health, writes to it."""

    def __init__(
        self,
        plc: PlcConfig,
        driver: Driver,
        table: TagTable,
        phase: float,
        log: EventLog,
        on_health: Callable[[], None],
        stats: PollStats | None = None,
    ) -> None:
        self.plc = plc
        self.driver = driver
        self.table = table
        self.phase = phase
        self.log = log
        self.switch = PathSwitch(driver.endpoints, plc.failback_after_s, plc.probe_interval_s)
        self.reachable: bool | None = None  # None until the first cycle ends
        self.last_ok: float | None = None  # monotonic time of the last good cycle
        self.problem = ""  # why it is not reachable, or which path is down
        self._fresh_until = 0.0
        self._expired = True  # no value confirmed yet, or marked stale since
        self._expiry: asyncio.TimerHandle | None = None
        self._probes: dict[int, asyncio.Task[None]] = {}
        self._on_health = on_health
        self._signature: tuple[object, ...] = ()
        self._problems_logged = 0
        self.stats = stats or PollStats()

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        # The poller's clock is time.monotonic(): uvloop's loop.time() counts whole
        # milliseconds, too coarse for lateness and latencies of a millisecond or two.
        clock = time.monotonic
        interval = self.plc.poll_interval_s
        slot = clock() + self.phase
        me = asyncio.current_task()
        try:
            while True:
                # Python 3.11's wait_for (which pymodbus uses) can swallow a cancellation
                # that lands as its inner request completes; do not poll on after one.
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError
                delay = slot - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                started = clock()
                try:
                    await self.cycle()
                except Exception as err:  # a bug must not stop the polling of this PLC
                    self.log.exception("poll cycle failed", err, plc=self.plc.name)
                    self.table.unreachable(f"internal error: {err!r}", time.time())
                ended = clock()
                self._record(started - slot, ended - slot)
                slot += interval
                if slot < ended:  # overran: skip the slots already gone
                    missed = int((ended - slot) // interval) + 1
                    self.stats.overruns += missed
                    slot += missed * interval
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            for task in self._probes.values():
                task.cancel()

    def _record(self, late: float, took: float) -> None:
        stats = self.stats
        stats.cycles += 1
        stats.late_counts[bisect.bisect_left(LATE_BUCKETS_S, late)] += 1
        stats.late_sum_s += late
        if self.reachable:  # read in this cycle
            stats.tags += len(self.table.tags)
        if stats.record:
            stats.lateness.append(late)
            stats.duration.append(took)

    async def cycle(self) -> None:
        switch = self.switch
        errors = []
        for path in switch.attempt_order():
            started, before = time.monotonic(), self.driver.requests
            try:
                await self.driver.read(path, self.table, time.time())
            except PathError as err:
                errors.append(f"{switch.name(path)}: {err}")
                if switch.failed(path, str(err), time.monotonic()):
                    self.log.warning(
                        "path down", plc=self.plc.name, path=switch.name(path), error=str(err)
                    )
                continue
            now = time.monotonic()
            requests = max(1, self.driver.requests - before)
            if switch.succeeded(path, (now - started) / requests, now):
                self.log.info("path up", plc=self.plc.name, path=switch.name(path))
            if path != switch.current:
                old = switch.use(path)
                self.log.warning(
                    "switched path",
                    plc=self.plc.name,
                    to=switch.name(path),
                    was=switch.name(old),
                    reason=switch.paths[old].last_error,
                )
            self._confirmed(started)
            # A read that took past the bound (a stall while it was under way) confirmed
            # nothing: stale before anything publishes its values as good.
            self.check_fresh()
            break
        else:
            self._failed("; ".join(errors))
        now = time.monotonic()
        if switch.failback_due(now):
            old = switch.use(0)
            self.log.info("back on the primary path", plc=self.plc.name, was=switch.name(old))
        if self.table.problems_version != self._problems_logged:
            self._problems_logged = self.table.problems_version
            if self.reachable:  # unreachable: the path errors say it all
                if self.table.problems:
                    self.log.warning("tags bad", plc=self.plc.name, problems=self.table.summary())
                else:
                    self.log.info("tags good again", plc=self.plc.name)
        for path in switch.probes_due(now):
            if path not in self._probes:
                task = asyncio.create_task(self._probe(path), name=f"probe {self.plc.name}:{path}")
                self._probes[path] = task
        self._update_health()

    def _confirmed(self, read_at: float) -> None:
        self.reachable = True
        self.last_ok = read_at
        self._fresh_until = read_at + self.plc.poll_interval_s + self.plc.timeout
        self._expired = False
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(
                self._fresh_until - time.monotonic(), self._expire
            )

    def _expire(self) -> None:
        """The freshness timer: no read confirmed the values in time."""
        left = self._fresh_until - time.monotonic()
        if left > 0:  # confirmed meanwhile: wait for the new limit
            self._expiry = asyncio.get_running_loop().call_later(left, self._expire)
            return
        self._expiry = None
        self.check_fresh()

    def check_fresh(self) -> None:
        """Turn the good values stale if no read confirmed them in time."""
        if not self._expired and time.monotonic() >= self._fresh_until:
            self._expired = True
            self.table.stale("no reply in time from the PLC", time.time())

    def _failed(self, why: str) -> None:
        wall = time.time()
        self.reachable = False
        self.table.stale(f"PLC unreachable: {why}", wall)
        if self.last_ok is None or time.monotonic() - self.last_ok >= self.plc.bad_after_s:
            self.table.unreachable(f"PLC unreachable: {why}", wall)
        self.problem = why

    async def _probe(self, path: int) -> None:
        switch = self.switch
        try:
            started = time.monotonic()
            try:
                await self.driver.probe(path)
            except PathError as err:
                if switch.failed(path, str(err), time.monotonic()):
                    self.log.warning(
                        "path down", plc=self.plc.name, path=switch.name(path), error=str(err)
                    )
            else:
                now = time.monotonic()
                if switch.succeeded(path, now - started, now):
                    self.log.info("path up", plc=self.plc.name, path=switch.name(path))
        except Exception as err:  # never let a probe kill anything
            self.log.exception("probe failed", err, plc=self.plc.name)
        finally:
            del self._probes[path]
            self._update_health()

    # -- health -----------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``ok``, ``degraded`` (reachable, a path down), ``down`` or ``starting``."""
        if self.reachable is None:
            return "starting"
        if not self.reachable:
            return "down"
        return "ok" if self.switch.all_up else "degraded"

    def _update_health(self) -> None:
        """Tell the listener, only when something it shows changed."""
        sw = self.switch
        if self.reachable:
            self.problem = "; ".join(
                f"{sw.name(i)} down ({p.last_error})"
                for i, p in enumerate(sw.paths)
                if p.up is False
            )
        signature = (
            self.state,
            sw.current,
            tuple(p.up for p in sw.paths),
            self.problem,
            self.table.problems_version,
        )
        if signature != self._signature:
            self._signature = signature
            self._on_health()

    def describe(self) -> str:
        """The PLC's state for people: ``ok``, or what is wrong with it."""
        state = self.state
        text = f"{state}: {self.problem}" if self.problem and state != "ok" else state
        if self.reachable and self.table.problems:
            text += "; " + self.table.summary()
        return text

    def report(self) -> PlcHealth:
        return PlcHealth(
            state=self.state,
            path=self.switch.current,
            paths=[p.report() for p in self.switch.paths],
            tags=self.table.counts(),
            problem=self.problem or None,
            critical=self.plc.critical,
        )

    # -- writes -----------------------------------------------------------------------
    async def write(self, index: int, value: Value, may_send: Callable[[], bool]) -> str:
        """Write one tag once; returns the path it went over. WriteError otherwise.

        Another path is tried only when the request certainly was not sent."""
        errors = []
        for path in self.switch.attempt_order():
            try:
                await self.driver.write(path, index, value, may_send)
            except PathError as err:
                errors.append(f"{self.switch.name(path)}: {err}")
                continue
            return self.switch.name(path)
        raise WriteError(
            S.BadNoCommunication, "PLC unreachable, write not sent: " + "; ".join(errors)
        )
