"""The lease session: an etcd lease kept alive, and the fence point it gives.

Every daemon that may act only while it holds a term (the agent for its services, the
comm server for its PLC writes) keeps one. It knows, on ``CLOCK_BOOTTIME`` (unlike the
monotonic clock, it goes on during a suspend), until when its holder may still act: the
*fence point*, ``fence_after`` seconds from the moment the last acknowledged keepalive
was **sent**. etcd restarts the lease's TTL when it *receives* that keepalive, which is
later, so with ``fence_after`` below the TTL the holder always stops first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hapair.shared.clock import Clock, boottime
from hapair.shared.histogram import Histogram
from hapair.shared.log import EventLog
from hapair.shared.slowest import Slowest, late_wake
from hapair.shared.store import Store, StoreError

ROUND_TRIP_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class Session:
    """One lease. ``valid(now)`` is the one test of whether its holder may act."""

    def __init__(
        self,
        store: Store,
        ttl: float,
        fence_after: float,
        log: EventLog,
        clock: Clock = boottime,
        on_change: Callable[[], None] = lambda: None,
        name: str = "lease",
    ) -> None:
        self.store = store
        # Timings of the lease held now, and those the next grant will use: a lease keeps
        # the TTL it was granted with, so its fence point must too.
        self.ttl = self.wanted_ttl = ttl
        self.fence_after = self.wanted_fence_after = fence_after
        self.may_regrant: Callable[[], bool] = lambda: False
        self.log = log
        self.clock = clock
        self.on_change = on_change
        self.name = name  # in log events: which of its daemon's leases
        self.lease: int | None = None
        self.granted_ttl: int | None = None  # what etcd granted for the last lease
        self.acked_send: float | None = None
        self.renewed = asyncio.Event()
        self.round_trips = Histogram(ROUND_TRIP_BOUNDS_S)
        """From sending each grant or keepalive to its answer, for the metrics."""
        self.slowest = Slowest()  # the same, the slowest lately
        self.lag = Slowest()
        """How late the loop that sends the keepalives woke up, lately."""

    @property
    def interval(self) -> float:
        return self.ttl / 4

    def valid(self, now: float) -> bool:
        return (
            self.lease is not None
            and self.acked_send is not None
            and (now < self.acked_send + self.fence_after)
        )

    @property
    def fence_deadline(self) -> float:
        """When the holder must have stopped acting (``-inf`` without a lease)."""
        return -float("inf") if self.acked_send is None else self.acked_send + self.fence_after

    def retune(self, ttl: float, fence_after: float) -> None:
        """New timings apply from the next grant; a shorter fence point applies at once.

        The next grant comes as soon as ``may_regrant()`` allows (the agent holds no term),
        or when the lease is lost."""
        self.wanted_ttl, self.wanted_fence_after = ttl, fence_after
        self.fence_after = min(self.fence_after, fence_after)

    def lost(self, lease: int) -> None:
        """etcd answered that ``lease`` is gone (a write on it was refused): stop counting
        on it at once; the next round takes a new one."""
        if self.lease == lease:
            self.log.warning(f"{self.name} lost", lease=f"{lease:x}")
            self.lease, self.acked_send = None, None
            self.on_change()

    async def _regrant_if_retuned(self) -> None:
        retuned = (self.wanted_ttl, self.wanted_fence_after) != (self.ttl, self.fence_after)
        if self.lease is not None and retuned and self.may_regrant():
            old, self.lease, self.acked_send = self.lease, None, None
            self.on_change()
            self.log.info(f"new {self.name} timings: taking a new {self.name}", ttl=self.wanted_ttl)
            await self.store.revoke(old)

    async def run(self) -> None:
        failing: str | None = None
        while True:
            sent = self.clock()
            try:
                await self._regrant_if_retuned()
                if self.lease is None:
                    self.ttl, self.fence_after = self.wanted_ttl, self.wanted_fence_after
                    self.lease, granted = await self.store.grant_lease(self.ttl)
                    self._acked(sent)
                    self.log.info(f"{self.name} granted", lease=f"{self.lease:x}", ttl=granted)
                    self._check_granted(granted)
                else:
                    lease = self.lease
                    granted = await self.store.keepalive(lease)
                    if granted <= 0:
                        self.lost(lease)
                        continue
                    if self.lease == lease:  # not lost meanwhile
                        self._acked(sent)
                if failing:
                    self.log.info("etcd reachable again")
                    failing = None
            except StoreError as err:
                if failing != str(err):
                    self.log.warning(f"{self.name} keepalive failed", error=str(err))
                failing = str(err)
            except Exception as err:
                # Whatever went wrong, the lease must be renewed again next round: a
                # session that ended would leave its holder fenced, and its keys gone,
                # for good. Unconfirmed meanwhile, the fence point holds as always.
                self.log.exception(f"{self.name} keepalive failed unexpectedly", err)
                failing = repr(err)
            await late_wake(sent + self.interval, self.clock, self.lag)

    def _check_granted(self, granted: int) -> None:
        """Say once when etcd keeps the lease longer than asked.

        The fence point still counts from the TTL asked, so this is safe; but a crashed
        holder is only taken over when etcd drops its lease, so takeovers take the longer
        time."""
        if granted > self.ttl and self.granted_ttl != granted:
            self.log.warning(
                f"etcd grants a longer {self.name} than asked: takeovers after a crash take "
                "as long; its raft timing sets the shortest lease it grants (1.5 election "
                "timeouts, rounded up to a second), see deploy/etcd/etcd.conf.yml",
                asked=self.ttl,
                granted=granted,
            )
        self.granted_ttl = granted

    def _acked(self, sent: float) -> None:
        now = self.clock()
        self.round_trips.observe(now - sent)
        self.slowest.note(now, now - sent)
        if self.acked_send is None or sent > self.acked_send:
            # How far the fence point still was when this confirmation moved it: what a
            # busy loop (a download, an unpack) left of the fence margin.
            left = self.fence_deadline - self.clock()
            self.acked_send = sent
            self.log.debug(
                f"{self.name} confirmed",
                sent=repr(sent),
                left=None if left == -float("inf") else f"{left:.3f}",
            )
        self.renewed.set()
        self.on_change()

    async def close(self) -> None:
        lease, self.lease, self.acked_send = self.lease, None, None
        if lease is not None:
            # If revoking takes longer than the TTL, the lease has expired anyway.
            try:
                await self.store.revoke(lease)
            except StoreError as err:
                self.log.warning(f"{self.name} revoke failed", error=str(err))
