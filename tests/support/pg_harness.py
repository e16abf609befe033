"""Real PostgreSQL nodes for tests and benchmarks: two or three nodes of one pair on
127.0.0.x (one port free on every address), data dirs in a temp dir, each driven by
its own ``PgManager`` as an agent would; every postmaster stopped by PID at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hapair.shared import pki
from hapair.shared.topology import Node, Pair
from hapair.workshop_agent.pg.config import DatabaseConfig, parse_database
from hapair.workshop_agent.pg.errors import PgError
from hapair.workshop_agent.pg.manager import PgManager, Timeouts
from hapair.workshop_agent.pg.proc import find_bin_dir, process_state
from tests.support.harness import free_port
from tests.support.harness import until as until  # re-exported: the tests wait with it
from tests.support.tls_etcd import TestPki

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
NAMES = ("a", "b", "c")
PASSWORDS = {"superuser": "su-secret", "replication": "repl-secret", "mes": "mes-secret"}
OS_USER = "postgres"


def postgres_available() -> str | None:
    """Why real PostgreSQL tests cannot run here, or None."""
    try:
        find_bin_dir()
    except PgError as err:
        return str(err)
    try:
        import pwd

        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"no {OS_USER} user (useradd --system --user-group {OS_USER})"
    if os.geteuid() != 0:
        return "tests start PostgreSQL as the postgres user through setpriv: run as root"
    return None


needs_postgres = pytest.mark.skipif(
    postgres_available() is not None, reason=str(postgres_available())
)


def common_free_port(addresses: tuple[str, ...] = ADDRESSES) -> int:
    """A port free on every address (each node binds its own address, same port):
    ``free_port`` finds one free on every address."""
    return free_port(addresses[0])


def database_section(root: Path, port: int, synchronous: bool = True) -> dict[str, Any]:
    pw = root / "secrets"
    return {
        "engine": "postgresql",
        "port": port,
        "data_dir": f"{root}/{{pair.name}}/{{node.name}}/pg",
        "os_user": OS_USER,
        "synchronous": synchronous,
        "degrade_after_s": 1,
        "parameters": {
            "max_connections": "50",
            "shared_buffers": "32MB",
            # A postmaster the tests SIGKILL leaves its POSIX segments in /dev/shm, in
            # memory, for good; mmap keeps them in the data directory, removed with it.
            "dynamic_shared_memory_type": "mmap",
        },
        "auth": {
            "superuser": "postgres",
            "superuser_password_file": str(pw / "superuser.pw"),
            "replication_user": "replicator",
            "replication_password_file": str(pw / "replication.pw"),
        },
        "clients": ["127.0.0.0/8"],
        "databases": [{"name": "mes", "owner": "mes", "password_file": str(pw / "mes.pw")}],
    }


def with_tls(
    section: dict[str, Any], test_pki: TestPki, addresses: Iterable[str]
) -> dict[str, Any]:
    """``section`` with TLS files of ``test_pki`` for servers on ``addresses`` (each
    certificate named after its address, issued on first use), unless it names its own
    or the lab mode: the secure default."""
    if "tls" in section or "security" in section:
        return section
    for address in addresses:
        test_pki.postgres(address)
    d = test_pki.dir
    tls = {
        "ca_file": str(d / pki.CA_CERT),
        "cert_file": f"{d}/postgres@{{node.address}}.crt",
        "key_file": f"{d}/postgres@{{node.address}}.key",
    }
    return {**section, "tls": tls}


def write_secrets(root: Path) -> None:
    pw = root / "secrets"
    pw.mkdir(mode=0o700)
    for name, password in PASSWORDS.items():
        (pw / f"{name}.pw").write_text(password + "\n")
        (pw / f"{name}.pw").chmod(0o600)


@dataclass
class PgCluster:
    """The nodes of one pair, ``a`` the main node; ``mgr[name]`` is each node's manager."""

    root: Path
    config: DatabaseConfig
    pair: Pair
    mgr: dict[str, PgManager] = field(default_factory=dict)

    def address(self, name: str) -> str:
        node = self.pair.node(name)
        assert node is not None
        return node.address

    @property
    def port(self) -> int:
        return self.config.port

    async def connect(self, name: str, dbname: str = "mes") -> psycopg.AsyncConnection[Any]:
        user, password = (
            ("mes", PASSWORDS["mes"]) if dbname == "mes" else ("postgres", PASSWORDS["superuser"])
        )
        return await psycopg.AsyncConnection.connect(
            host=self.address(name), port=self.port, user=user, password=password,
            dbname=dbname, autocommit=True, connect_timeout=2,
        )  # fmt: skip

    def multi_host(self) -> str:
        hosts = ",".join(n.address for n in self.pair.nodes)
        ports = ",".join(str(self.port) for _ in self.pair.nodes)
        return (
            f"host={hosts} port={ports} dbname=mes user=mes password={PASSWORDS['mes']}"
            " target_session_attrs=read-write connect_timeout=2"
        )

    def crash(self, name: str) -> int:
        """SIGKILL the node's postmaster, as a power cut would stop it; its PID, once dead."""
        pid = self.mgr[name].postmaster_pid()
        assert pid is not None, f"{name} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_state(pid) == "running" and time.monotonic() < deadline:
            time.sleep(0.0005)
        return pid

    async def stop_all(self) -> None:
        for mgr in self.mgr.values():
            await mgr.close()
            pid = mgr.postmaster_pid()
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown: nothing to keep
            if not await gone(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def gone(pid: int, timeout: float) -> bool:
    async def dead() -> bool:
        return process_state(pid) != "running"

    try:
        await until(dead, timeout, f"PID {pid} gone")
    except AssertionError:
        return False
    return True


def make_cluster(
    nodes: int = 2, *, synchronous: bool = True, timeouts: Timeouts | None = None
) -> PgCluster:
    root = Path(tempfile.mkdtemp(prefix="hapair-pg-"))
    root.chmod(0o755)  # the postgres user must reach the data dirs below
    write_secrets(root)
    # The site's PKI directory as hapair pki makes it (0700): the database's user cannot
    # read it, the agent copies what the server needs.
    pki.init(root / "pki", "tests")
    section = database_section(root, common_free_port(ADDRESSES[:nodes]), synchronous)
    config = parse_database(with_tls(section, TestPki(root / "pki"), ADDRESSES[:nodes]))
    pair = Pair(
        name="line1",
        nodes=[Node(name=n, address=a) for n, a in zip(NAMES[:nodes], ADDRESSES, strict=False)],
    )
    cluster = PgCluster(root, config, pair)
    for node in pair.nodes:
        cluster.mgr[node.name] = PgManager.open(config, pair, node, timeouts or Timeouts())
    return cluster


@contextlib.asynccontextmanager
async def running_cluster(nodes: int = 2, **kw: Any) -> AsyncIterator[PgCluster]:
    cluster = make_cluster(nodes, **kw)
    try:
        yield cluster
    finally:
        await cluster.stop_all()
        cluster.cleanup()


async def primary_with_standbys(cluster: PgCluster, epoch: int = 1) -> None:
    """``a`` initialised as primary, the others cloned and streaming, all synchronous."""
    await cluster.mgr["a"].ensure_primary(epoch)
    others = [n.name for n in cluster.pair.nodes if n.name != "a"]
    for name in others:
        await cluster.mgr[name].ensure_standby(cluster.address("a"))
    for name in others:
        await until(lambda n=name: streaming(cluster, n), 15, f"{name} streaming")  # type: ignore[misc]
    assert sorted(await cluster.mgr["a"].restore_sync(others)) == others
    async with await cluster.connect("a") as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")


async def streaming(cluster: PgCluster, name: str) -> bool:
    st = await cluster.mgr[name].status()
    return st.role == "standby" and st.streaming


# A writer's connection to a server that died without a word (its host frozen or cut
# off, the connection left established) is given up, as a client's driver would, instead
# of waiting on it for good: the write after a few seconds, the idle socket by TCP.
WRITE_S = 5.0
KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
              "keepalives_count": 3, "tcp_user_timeout": 5000}  # fmt: skip


class Writer:
    """Commits numbered rows as fast as it can, reconnecting through the libpq multi-host
    string with ``target_session_attrs=read-write`` as a real client would; remembers
    every id whose commit was acknowledged, and when."""

    def __init__(self, conninfo: str, first_id: int = 1) -> None:
        self.conninfo = conninfo
        self.next_id = first_id
        self.acked: list[int] = []
        self.acked_at: list[tuple[float, str]] = []  # when, and by which server
        self.errors: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Writer:
        self._task = asyncio.create_task(self._run())
        return self

    def first_ack_after(self, t: float, host: str) -> float | None:
        return next((at for at, by in self.acked_at if at > t and by == host), None)

    async def acked_after(self, t: float, host: str, timeout: float = 15) -> float:
        """When the first commit after ``t`` was acknowledged by ``host``."""

        async def seen() -> float | None:
            return self.first_ack_after(t, host)

        return float(await until(seen, timeout, f"a commit acknowledged by {host}", step=0.002))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                try:
                    if conn is None:
                        conn = await psycopg.AsyncConnection.connect(
                            self.conninfo, autocommit=True, **KEEPALIVES
                        )
                    n, self.next_id = self.next_id, self.next_id + 1
                    # Given up on the client's side, not with statement_timeout: a
                    # server cancelling a commit's wait for its standby reports it
                    # committed. A commit given up on is not counted as acknowledged,
                    # whatever became of it.
                    async with asyncio.timeout(WRITE_S):
                        await conn.execute("INSERT INTO ticks (id) VALUES (%s)", (n,))
                    self.acked_at.append((time.monotonic(), conn.info.host))
                    self.acked.append(n)
                except (psycopg.Error, TimeoutError) as err:
                    kind = type(err).__name__
                    self.errors[kind] = self.errors.get(kind, 0) + 1
                    if conn is not None:
                        await conn.close()
                    conn = None
                    await asyncio.sleep(0.002)
        finally:
            if conn is not None:
                conn.pgconn.finish()


async def ids_on(cluster: PgCluster, name: str) -> set[int]:
    async with await cluster.connect(name) as conn:
        cur = await conn.execute("SELECT id FROM ticks")
        return {int(r[0]) for r in await cur.fetchall()}


@contextlib.asynccontextmanager
async def stalled_walsender(host: str, port: int, standby: str) -> AsyncIterator[int]:
    """The primary at ``host`` stops sending WAL to ``standby`` (its walsender SIGSTOPped,
    so nothing new even reaches the standby's socket), which stays connected and counted
    as streaming; sent again on exit. Yields the walsender's PID."""
    async with await psycopg.AsyncConnection.connect(
        host=host, port=port, user="postgres", password=PASSWORDS["superuser"],
        dbname="postgres", autocommit=True, connect_timeout=2,
    ) as su:  # fmt: skip
        cur = await su.execute(
            "SELECT pid FROM pg_stat_replication WHERE application_name = %s", (standby,)
        )
        row = await cur.fetchone()
    assert row is not None, f"{standby} is not connected to {host}"
    pid = int(row[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
