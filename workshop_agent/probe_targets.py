"""The pair's probe targets: ``host:port`` with a TCP connect, ``host`` with an ICMP
echo (raw socket: the agent runs as root).

Both leave from the node's own address, so the route tested is the one its services
use. The targets are the witnesses of isolation: a node that reaches none of them for
``isolation_after_s`` is cut off (``probe_results.summarize``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterable

from hapair.shared.clock import Clock
from hapair.shared.network import Target
from hapair.workshop_agent.probe_results import ProbeError, ProbeResult


async def tcp_probe(host: str, port: int, source: str | None, timeout: float) -> None:
    """Connect to host:port from ``source``; raise OSError or TimeoutError on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        if source is not None and (":" in source) == (family == socket.AF_INET6):
            sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Pinger:
    """ICMP echo over one raw IPv4 socket bound to the node's address.

    A raw socket sees every ICMP packet sent to that address, so replies are matched by
    identifier, sequence number and source address."""

    def __init__(self, source: str | None) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.setblocking(False)
        if source is not None and ":" not in source:
            self._sock.bind((source, 0))
        # Random per socket: several agents (or tests) in one host must not take each
        # other's replies.
        self._ident = int.from_bytes(os.urandom(2), "big")
        self._seq = 0
        self._waiting: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def ping(self, host: str, timeout: float) -> None:
        """One echo; raise OSError or TimeoutError when it is not answered."""
        self._seq = (self._seq + 1) % 2**16
        seq = self._seq
        header = struct.pack("!BBHHH", 8, 0, 0, self._ident, seq)
        payload = b"hapair-probe"
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), self._ident, seq)
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiting[seq] = (host, future)
        try:
            self._sock.sendto(packet + payload, (host, 0))
            async with asyncio.timeout(timeout):
                await future
        finally:
            self._waiting.pop(seq, None)

    def _readable(self) -> None:
        while True:
            try:
                data, _ = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error queued on the socket: the waiting ping times out
            self._reply(data)

    def _reply(self, data: bytes) -> None:
        if len(data) < 20 or data[0] >> 4 != 4:
            return
        ihl = (data[0] & 0x0F) * 4
        if len(data) < ihl + 8:
            return
        kind, code, _, ident, seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
        waiting = self._waiting.get(seq)
        source = socket.inet_ntoa(data[12:16])
        if kind != 0 or code != 0 or ident != self._ident or waiting is None:
            return
        host, future = waiting
        if source == host and not future.done():
            future.set_result(None)


def why_failed(err: BaseException) -> str:
    """A probe's failure in a few words, for its result and the log."""
    if isinstance(err, TimeoutError):
        return "no answer in time"
    if isinstance(err, OSError):
        # asyncio puts "Connect call failed (...)" in strerror; the errno says more.
        return os.strerror(err.errno) if err.errno else str(err)
    return repr(err)


class TargetProber:
    """The pair's probe targets, probed all at once each round from ``source``."""

    def __init__(
        self,
        source: str | None,
        targets: Iterable[Target],
        timeout: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.source = source
        self.timeout = timeout
        self.clock = clock
        now = clock()
        self._results = {t: ProbeResult(now) for t in targets}
        self._pinger: Pinger | None = None

    def open(self) -> None:
        if any(t.port is None for t in self._results):
            try:
                self._pinger = Pinger(self.source)
            except OSError as err:
                raise ProbeError(f"ICMP socket on {self.source}: {err}") from err

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.close()
            self._pinger = None

    async def probe(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for target in self._results:
                tg.create_task(self._one(target))

    def results(self) -> dict[str, ProbeResult]:
        return {str(t): result for t, result in self._results.items()}

    async def _one(self, target: Target) -> None:
        start = self.clock()
        try:
            if target.port is not None:
                await tcp_probe(target.host, target.port, self.source, self.timeout)
            elif self._pinger is not None:
                await self._pinger.ping(target.host, self.timeout)
        except (OSError, TimeoutError) as err:
            self._results[target] = self._results[target].missed(why_failed(err))
            return
        now = self.clock()
        self._results[target] = self._results[target].answered(now, now - start)
