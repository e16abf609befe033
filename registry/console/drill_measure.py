"""What ``hapair drill`` measures, as a client of the pair sees it.

:class:`Probe` asks, every few milliseconds, where the service is (the resolver,
following the registry's stream) and opens a TCP connection there: a sample is good
when the registry gives a current (not stale) endpoint *and* it accepts the
connection. The outage is the time from the first bad sample after the fault to the
next good one; the takeover, the time from the fault to the first good sample served
under a newer epoch.

:class:`Writer` commits numbered rows through the pair's ``{pair}.db`` endpoint and
remembers each acknowledged one: a row acknowledged and missing on the new primary is
a lost commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hapair.registry.console.drill_faults import mark
from hapair.shared.client.errors import ClientError
from hapair.shared.client.resolver import Resolver

PROBE_S = 0.02
CONNECT_TIMEOUT_S = 0.25
SQL_TIMEOUT_S = 2.0
TABLE = "hapair_drill"


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    ok: bool
    epoch: int | None
    node: str | None


async def connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    mark(sock)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()


@dataclass
class Probe:
    resolver: Resolver
    service: str
    samples: list[Sample] = field(default_factory=list)

    async def run(self) -> None:
        async with self.resolver.following(self.service):
            with contextlib.suppress(ClientError):
                await self.resolver.resolve(self.service)
            while True:
                started = time.monotonic()
                state = self.resolver.state(self.service)
                ep = state.endpoint
                ok = (
                    ep is not None
                    and not state.stale
                    and state.status in (None, 200)
                    and await connect(ep.host, ep.port)
                )
                if not ok:
                    self.resolver.poke(self.service)
                self.samples.append(
                    Sample(time.monotonic(), ok, ep.epoch if ep else None, ep.node if ep else None)
                )
                await asyncio.sleep(max(0.0, started + PROBE_S - time.monotonic()))

    def good_since(self, t: float) -> Sample | None:
        return next((s for s in self.samples if s.at >= t and s.ok), None)


@dataclass(frozen=True)
class Figures:
    outage_s: float
    recovered: Sample | None
    takeover: Sample | None


def figures(samples: list[Sample], t0: float, old_epoch: int) -> Figures:
    """Outage (first bad sample after ``t0`` to the next good one) and takeover."""
    after = [s for s in samples if s.at >= t0]
    first_bad = next((s for s in after if not s.ok), None)
    takeover = next((s for s in after if s.ok and (s.epoch or 0) > old_epoch), None)
    if first_bad is None:
        return Figures(0.0, after[0] if after else None, takeover)
    recovered = next((s for s in after if s.ok and s.at > first_bad.at), None)
    end = recovered.at if recovered else (after[-1].at if after else t0)
    return Figures(end - first_bad.at, recovered, takeover)


@dataclass
class Writer:
    """Commits ``(run, n)`` rows as fast as it can through the database endpoint."""

    resolver: Resolver
    service: str
    dbname: str
    user: str
    password: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    acked: list[int] = field(default_factory=list)
    last_ack: float = 0.0
    errors: int = 0
    _next: int = 1

    async def _open(self) -> Any:
        import psycopg

        ep = await self.resolver.resolve(self.service)
        conn = await psycopg.AsyncConnection.connect(
            host=ep.host,
            port=ep.port,
            dbname=self.dbname,
            user=self.user,
            password=self.password,
            connect_timeout=2,
            autocommit=True,
        )
        # Only a primary counts: a standby being promoted refuses the writes anyway.
        return conn

    async def prepare(self) -> None:
        async with asyncio.timeout(10):
            conn = await self._open()
            try:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {TABLE} (run text, n bigint, "
                    "at timestamptz DEFAULT now(), PRIMARY KEY (run, n))"
                )
            finally:
                await conn.close()

    async def run(self) -> None:
        import psycopg

        conn: Any = None
        try:
            while True:
                try:
                    async with asyncio.timeout(SQL_TIMEOUT_S):
                        if conn is None:
                            conn = await self._open()
                        n = self._next
                        self._next += 1
                        await conn.execute(
                            f"INSERT INTO {TABLE} (run, n) VALUES (%s, %s)", (self.run_id, n)
                        )
                    self.acked.append(n)
                    self.last_ack = time.monotonic()
                except (psycopg.Error, OSError, TimeoutError, ClientError):
                    self.errors += 1
                    if conn is not None:
                        conn.pgconn.finish()  # never wait on a dead server to close
                    conn = None
                    await asyncio.sleep(0.01)
        finally:
            if conn is not None:
                conn.pgconn.finish()

    async def lost(self, timeout: float = 30.0) -> list[int]:
        """Acknowledged rows missing on the primary now; then this run's rows deleted."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                    conn = await self._open()
                    try:
                        cur = await conn.execute(
                            f"SELECT n FROM {TABLE} WHERE run = %s", (self.run_id,)
                        )
                        present = {int(r[0]) for r in await cur.fetchall()}
                        await conn.execute(f"DELETE FROM {TABLE} WHERE run = %s", (self.run_id,))
                    finally:
                        await conn.close()
                return sorted(set(self.acked) - present)
            except (psycopg.Error, OSError, TimeoutError, ClientError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
