"""The site under chaos: every node and etcd member a host of a :class:`netns.Lab`.

Pair ``p`` (nodes ``a``, ``b``) runs one recording service; with a database, pair ``q``
(nodes ``c``, ``d``) runs PostgreSQL too, and a writer commits numbered rows to it. The
driving process sits in the host ``obs``, which is also the pairs' probe target (the
gateway of the workshop). Secure as a plant runs: etcd with TLS and client certificates
(a PKI made in the run's directory), each agent its node's certificate, each pair its
peer key; ``secure=False`` runs the lab mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from hapair.shared import keys
from hapair.shared.records import SyncState, decode
from hapair.shared.store import StoreError
from tests.chaos.etcd_members import EtcdMembers
from tests.support.cluster import Cluster, pid_alive, recording_service, until
from tests.support.netns import Lab
from tests.support.pg_harness import PASSWORDS, Writer, database_section, write_secrets
from tests.support.tls_etcd import TestPki

ETCD = ("e1", "e2", "e3")
OBSERVER = "obs"
PAIRS = {"p": ("a", "b"), "q": ("c", "d")}
DB_PAIR = "q"
SERVICE_PORT = {"p": 8080, "q": 8081}
PEER_PORT = 7400
DB_PORT = 5432
LEASE_TTL_S = 2.0
TERM_BEAT = {"interval_ms": 50, "fence_ms": 150, "margin_ms": 150}
FENCE_MARGIN_S = 0.5
HTTP_TIMEOUT_S = 0.5


def hosts(database: bool) -> list[str]:
    nodes = [n for pair, ns in PAIRS.items() if database or pair != DB_PAIR for n in ns]
    return [*nodes, *ETCD, OBSERVER]


@dataclass(kw_only=True)
class NetCluster(Cluster):
    """:class:`cluster.Cluster` whose agents run inside their node's host of the lab."""

    lab: Lab

    def spawn(self, node: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return self.lab.spawn(self.lab[node], *argv, **kw)


async def http_json(host: str, port: int, timeout: float = HTTP_TIMEOUT_S) -> dict[str, Any] | None:
    """The JSON body of ``GET /`` when it answers 200 in time, else None."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(b"GET / HTTP/1.0\r\nHost: chaos\r\n\r\n")
        data = await asyncio.wait_for(reader.read(65536), timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
            return None
        answer = json.loads(body)
        return answer if isinstance(answer, dict) else None
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@dataclass
class Testbed:
    lab: Lab
    root: Path
    database: bool
    secure: bool = True
    term_beat: bool = False
    members: EtcdMembers = field(init=False)
    cluster: NetCluster = field(init=False)
    writer: Writer | None = None
    pairs: dict[str, tuple[str, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.pairs = {p: ns for p, ns in PAIRS.items() if self.database or p != DB_PAIR}
        etcd_dir = self.root / "etcd"
        etcd_dir.mkdir()
        pki = TestPki.create(self.root / "pki") if self.secure else None
        self.members = EtcdMembers(self.lab, ETCD, etcd_dir, pki)
        self.cluster = NetCluster(self.members, self.root, lab=self.lab)

    # -- the site -------------------------------------------------------------------
    def address(self, node: str) -> str:
        return self.lab[node].address

    def pair_spec(self, pair: str) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": pair,
            "nodes": [{"name": n, "address": self.address(n)} for n in self.pairs[pair]],
            "failover": {"lease_ttl_s": LEASE_TTL_S, "fence_margin_s": FENCE_MARGIN_S},
            "services": [
                recording_service(
                    f"{pair}-svc", SERVICE_PORT[pair], self.cluster.record, critical=True
                )
            ],
            "network": {
                "probe_targets": [self.address(OBSERVER)],
                "probe_interval_s": 0.2,
                "isolation_after_s": 1.0,
                "peer_port": PEER_PORT,
            },
        }
        if self.term_beat:
            spec["failover"]["term_beat"] = TERM_BEAT
        if pair == DB_PAIR:
            db = database_section(self.root, DB_PORT, synchronous=True)
            db["clients"] = [f"{self.address(OBSERVER)}/32"]  # the writer
            spec["database"] = db
        return spec

    def conninfo(self) -> str:
        nodes = self.pairs[DB_PAIR]
        return (
            f"host={','.join(self.address(n) for n in nodes)} "
            f"port={','.join(str(DB_PORT) for _ in nodes)} dbname=mes user=mes "
            f"password={PASSWORDS['mes']} target_session_attrs=read-write connect_timeout=2"
        )

    async def start(self) -> None:
        await asyncio.to_thread(self.members.start)
        if self.database:
            self.root.chmod(0o755)  # PostgreSQL runs as its own user below it
            write_secrets(self.root)
        site = self.cluster.site([self.pair_spec(p) for p in self.pairs])
        await self.cluster.apply(site)
        # Each pair's main node alone first, so that it is the one active; the pairs
        # side by side (the database pair's primary spends seconds on its initdb).
        for nodes in self.pairs.values():
            self.cluster.start(nodes[0])
        await asyncio.gather(
            *(self.cluster.active(p, node=ns[0], timeout=60) for p, ns in self.pairs.items())
        )
        for nodes in self.pairs.values():
            for node in nodes[1:]:
                self.cluster.start(node)
        if self.database:
            await until(self.db_ready, 120, "the database pair's standby synchronous")
            await self.start_writer()

    async def start_writer(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.conninfo(), autocommit=True) as c:
            await c.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")
        self.writer = Writer(self.conninfo()).start()

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.stop()
        await self.cluster.stop_all()
        await asyncio.to_thread(self.members.stop)

    # -- what is true now -------------------------------------------------------------
    def other(self, pair: str, node: str) -> str:
        return next(n for n in self.pairs[pair] if n != node)

    async def node_for(self, pair: str, role: str) -> str:
        """The node holding ``role`` (active or standby) now; the main node when none is."""
        lead = await self.cluster.leader(pair)
        active = lead[0] if lead is not None else self.pairs[pair][0]
        return active if role == "active" else self.other(pair, active)

    async def serving(self, pair: str, since: float = 0.0) -> str | None:
        """The node serving ``pair`` now, by the leader key, its status and its service's
        own answer; for the database pair, also a commit acknowledged after ``since``.
        None while etcd cannot say: an unreadable store serves no client either."""
        try:
            lead = await self.cluster.leader(pair)
            if lead is None:
                return None
            node = lead[0]
            st = await self.cluster.status(node)
        except StoreError:
            return None
        if st is None or st.role != "active":
            return None
        answer = await http_json(self.address(node), SERVICE_PORT[pair])
        if answer is None or answer.get("node") != node:
            return None
        if pair == DB_PAIR and self.writer is not None:
            # A backend outlives a killed postmaster long enough to acknowledge a commit
            # or two: only a running postmaster serves the pair.
            if self.postmaster_pid(pair, node) is None:
                return None
            acked = self.writer.acked_at
            if not acked or acked[-1][0] <= since:
                return None
        return node

    async def db_ready(self) -> bool:
        try:
            lead = await self.cluster.leader(DB_PAIR)
            kv = await self.cluster.store.get(keys.sync_standby(DB_PAIR))
        except StoreError:
            return False
        if lead is None or kv is None:
            return False
        st = decode(SyncState, kv.value, kv.key)
        standby = self.other(DB_PAIR, lead[0])
        return st.primary == lead[0] and standby in st.sync and not st.degraded

    async def unsettled(self) -> str | None:
        """Why the site is not back to normal (every etcd member healthy, every pair
        settled), or None when it is."""
        healthy = await asyncio.to_thread(self.members.healthy)
        if len(healthy) != len(self.members.names):
            return f"etcd members healthy: {healthy}"
        for pair in self.pairs:
            why = await self.pair_unsettled(pair)
            if why is not None:
                return why
        return None

    async def pair_unsettled(self, pair: str) -> str | None:
        """Why ``pair`` is not back to normal: served, every other node a healthy standby,
        the database's standby synchronous; None when it is."""
        active = await self.serving(pair)
        if active is None:
            return f"pair {pair} not served"
        for node in self.pairs[pair]:
            if node == active:
                continue
            try:
                st = await self.cluster.status(node)
            except StoreError as err:
                return str(err)
            if st is None or st.role != "standby" or not st.healthy:
                role = None if st is None else (st.role, st.healthy, st.problems)
                return f"{node} not a healthy standby: {role}"
        if pair == DB_PAIR and not await self.db_ready():
            return "the database pair's standby not synchronous"
        return None

    # -- acting on processes ------------------------------------------------------------
    def crash(self, node: str) -> int:
        """Power cut: everything running in the node stops at once. Services' runs are
        ended at that instant in their record, as they stopped serving then."""
        pids = self.lab[node].pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            if (self.cluster.record / f"{pid}.log").exists():
                with contextlib.suppress(ProcessLookupError):
                    self.cluster.kill_service(pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        agent = self.cluster.agents.get(node)
        if agent is not None:
            agent.wait(5)
        return len(pids)

    async def healthy_standby(self, node: str, timeout: float) -> bool:
        """Wait until ``node`` reports itself a healthy standby; False past ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(StoreError):
                st = await self.cluster.status(node)
                if st is not None and st.role == "standby" and st.healthy:
                    return True
            await asyncio.sleep(0.05)
        return False

    def restart_agent(self, node: str) -> None:
        """Stop the agent as systemd would (SIGTERM, waited for) and start it again."""
        agent = self.cluster.agents.get(node)
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        self.cluster.start(node)

    def escaped_runs(self) -> int:
        """How many runs of a service recorded themselves as escaped grandchildren."""
        return sum(
            1
            for path in self.cluster.record.glob("*.log")
            if '"escaped": true' in path.read_text(errors="replace").split("\n", 1)[0]
        )

    def signal_agent(self, node: str, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.cluster.signal(node, sig)

    async def service_pid(self, pair: str, node: str, wait: float = 3.0) -> int | None:
        """The PID of ``pair``'s service running on ``node``, by its status; the status
        may name a run that just ended for a publish round, so it is read again for
        ``wait`` seconds before None."""
        deadline = time.monotonic() + wait
        while True:
            st = await self.cluster.status(node)
            svc = next((s for s in st.services if s.name == f"{pair}-svc"), None) if st else None
            pid = svc.pid if svc is not None and svc.state == "running" else None
            if pid is not None and pid in self.lab[node].pids():
                return pid
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.1)

    def postmaster_pid(self, pair: str, node: str) -> int | None:
        path = self.root / pair / node / "pg" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(path.read_text().splitlines()[0])
            return pid if pid_alive(pid) and pid in self.lab[node].pids() else None
        return None
