"""Network probes of the agent: the peer path and the probe targets on one timer.

- :class:`~hapair.workshop_agent.peer_path.PeerPath` (``peer_path.py``) pings the peers
  over UDP and carries the hold messages of an active that cannot reach etcd;
- :class:`~hapair.workshop_agent.probe_targets.TargetProber` (``probe_targets.py``)
  probes the pair's ``probe_targets`` from the node's own address;
- :func:`~hapair.workshop_agent.probe_results.summarize` (``probe_results.py``) turns
  their results and the clock into alarms and the isolation verdict, with no I/O.

:class:`NetworkProbes` here starts both, runs their rounds, and gives the summary.
All times are on the local monotonic clock; no other server's clock is ever read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Mapping

from hapair.shared.clock import Clock, boottime
from hapair.shared.network import MAX_TIMEOUT_S, Network
from hapair.shared.waits import cancelled
from hapair.workshop_agent.peer_path import PeerPath
from hapair.workshop_agent.peer_wire import PeerAuth
from hapair.workshop_agent.probe_results import (
    NetworkSummary,
    ProbeError,
    ProbeResult,
    next_verdict_change,
    summarize,
)
from hapair.workshop_agent.probe_targets import TargetProber, why_failed

log = logging.getLogger("hapair.probes")


class NetworkProbes:
    """The network probing of one node: ``start()``, read ``summary()``, ``close()``.

    ``peers`` maps the other nodes of the pair to their addresses. To apply a new
    topology, close this one and start a new one."""

    def __init__(
        self,
        me: str,
        address: str,
        peers: Mapping[str, str],
        network: Network,
        auth: PeerAuth,
        clock: Clock = boottime,  # hold promises count against the agent's fence point
    ) -> None:
        """``auth`` seals and opens the peer path's datagrams (``peer_wire.py``)."""
        self.me = me
        self.address = address
        self.network = network
        self.clock = clock
        self.auth = auth
        self._peer_addresses = dict(peers)
        self.peer_path: PeerPath | None = None
        self.targets: TargetProber | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the peer path and the ICMP socket, then probe every interval."""
        source = await _resolve(self.address)
        peers = {n: await _resolve_or_none(a) for n, a in self._peer_addresses.items()}
        self.peer_path = PeerPath(self.me, peers, self.network, self.auth, self.clock)
        await self.peer_path.open(source)
        self.targets = TargetProber(
            source, self.network.targets(), self.network.timeout_s, self.clock
        )
        try:
            self.targets.open()
        except ProbeError:
            self.peer_path.close()
            raise
        self._task = asyncio.create_task(self._run(), name=f"probes-{self.me}")

    async def close(self) -> None:
        for err in await cancelled(self._task):
            log.error("network probes failed: %s", err)
        self._task = None
        if self.peer_path is not None:
            self.peer_path.close()
        if self.targets is not None:
            self.targets.close()

    async def __aenter__(self) -> NetworkProbes:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def peers(self) -> dict[str, ProbeResult]:
        return self.peer_path.results() if self.peer_path is not None else {}

    def target_results(self) -> dict[str, ProbeResult]:
        return self.targets.results() if self.targets is not None else {}

    def summary(self) -> NetworkSummary:
        return summarize(self.network, self.peers(), self.target_results(), self.clock())

    def verdict_due_in(self) -> float | None:
        """Seconds until silence alone changes the summary (None: it cannot)."""
        now = self.clock()
        at = next_verdict_change(self.network, self.peers(), self.target_results(), now)
        return None if at is None else at - now

    async def _run(self) -> None:
        interval = self.network.probe_interval_s
        next_round = self.clock()
        while True:
            try:
                await self._round()
            except Exception:  # a bug in a round must not end probing for good
                log.exception("network probe round failed")
            # Rounds keep to a fixed grid; one that overran starts the next at once.
            next_round = max(next_round + interval, self.clock())
            await asyncio.sleep(next_round - self.clock())

    async def _round(self) -> None:
        assert self.peer_path is not None and self.targets is not None
        self.peer_path.probe()
        await self.targets.probe()


async def _resolve(host: str) -> str:
    """Once, at start: a name server outage later must not stop probing."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))  # normalized, as the kernel writes it
    try:
        async with asyncio.timeout(MAX_TIMEOUT_S * 5):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (OSError, TimeoutError) as err:
        raise ProbeError(f"cannot resolve {host}: {why_failed(err)}") from err
    return str(infos[0][4][0])


async def _resolve_or_none(host: str) -> str | None:
    # A peer that does not resolve is reported not visible; it does not stop the rest.
    try:
        return await _resolve(host)
    except ProbeError as err:
        log.warning("peer address does not resolve: %s", err)
        return None
