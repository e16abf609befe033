"""PostgreSQL facing the plant network: who may log in from where, and TLS.

Real PostgreSQL on 127.0.0.x. The clients' network of the tests is 127.0.0.0/8, which
holds the nodes' addresses too, as a plant's client network may. A client on another
address of it is played by a relay that connects to the server from that address
(libpq cannot choose its source address).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hapair.shared import keys
from hapair.shared.records import SyncState, decode
from hapair.workshop_agent.pg.proc import find_bin_dir
from tests.support.cluster import Cluster, until
from tests.support.harness import Etcd
from tests.support.pg_harness import (
    PASSWORDS,
    PgCluster,
    Writer,
    common_free_port,
    database_section,
    needs_postgres,
    primary_with_standbys,
    running_cluster,
    write_secrets,
)

pytestmark = [needs_postgres]

CLIENT = "127.0.77.7"  # in the clients' network, no node's address
ADDRESSES = ("127.0.0.1", "127.0.0.2")  # PostgreSQL sees loopback clients as .1: node a


class FromAddress:
    """A TCP relay on 127.0.0.1 to ``upstream`` whose connections leave from ``source``:
    the server sees a client on ``source``."""

    def __init__(self, source: str, upstream: tuple[str, int]) -> None:
        self.source, self.upstream = source, upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FromAddress:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            *self.upstream, local_addr=(self.source, 0)
        )
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        dst.close()


async def connect(
    host: str, port: int, user: str, dbname: str = "postgres", **kw: str
) -> psycopg.AsyncConnection[Any]:
    password = {"postgres": "superuser", "replicator": "replication"}.get(user, user)
    return await psycopg.AsyncConnection.connect(
        host=host, port=port, user=user, password=PASSWORDS[password], dbname=dbname,
        autocommit=True, connect_timeout=5, **kw,
    )  # fmt: skip


async def refused(host: str, port: int, user: str, **kw: str) -> str:
    """The server's refusal of a login (the test fails if it lets the user in)."""
    try:
        conn = await connect(host, port, user, **kw)
    except psycopg.OperationalError as err:
        return str(err)
    await conn.close()
    raise AssertionError(f"{user} logged in through {host}:{port} ({kw or 'defaults'})")


def psql(
    cluster: PgCluster, conninfo: str, command: str, password: str
) -> subprocess.CompletedProcess[str]:
    """PostgreSQL's own client, as a replication client would connect (simple protocol)."""
    return subprocess.run(
        [str(find_bin_dir() / "psql"), "-X", "-A", "-t", "-c", command,
         f"host={cluster.address('a')} port={cluster.port} {conninfo}"],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
    )  # fmt: skip


async def test_the_superuser_and_the_replication_user_are_refused_from_a_client_address() -> None:
    async with running_cluster(2) as c:
        await c.mgr["a"].ensure_primary(1)
        async with FromAddress(CLIENT, (c.address("a"), c.port)) as relay:
            # A client on that address logs in: the path works, and it is a client's.
            async with await connect("127.0.0.1", relay.port, "mes", dbname="mes") as conn:
                cur = await conn.execute("SELECT host(inet_client_addr())")
                assert await cur.fetchone() == (CLIENT,)
            # The superuser and the replication user, with their right passwords, do not.
            for user in ("postgres", "replicator"):
                why = await refused("127.0.0.1", relay.port, user)
                assert f'pg_hba.conf rejects connection for host "{CLIENT}", user "{user}"' in why
            why = await refused("127.0.0.1", relay.port, "replicator", replication="true")
            assert f'rejects replication connection for host "{CLIENT}"' in why
            # A client must use TLS: without it the same login is refused.
            why = await refused("127.0.0.1", relay.port, "mes", dbname="mes", sslmode="disable")
            assert "no encryption" in why
            async with await connect("127.0.0.1", relay.port, "mes", dbname="mes") as conn:
                cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                assert await cur.fetchone() == (True,)  # libpq's default takes TLS unasked
        # From a node's own address the superuser gets in, over TLS, checking the server.
        ca = str(c.root / "pki" / "ca.crt")
        async with await connect(
            c.address("a"), c.port, "postgres", sslmode="verify-full", sslrootcert=ca
        ) as conn:
            cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert await cur.fetchone() == (True,)


async def test_a_replication_connection_without_tls_is_refused_and_standbys_stream_over_tls() -> (
    None
):
    async with running_cluster(2) as c:
        await c.mgr["a"].ensure_primary(1)
        # From 127.0.0.1, node a's own address: the replication user's one place.
        plain = psql(c, "user=replicator replication=true sslmode=disable", "IDENTIFY_SYSTEM",
                     PASSWORDS["replication"])  # fmt: skip
        assert plain.returncode != 0, f"a replication connection in clear: {plain.stdout}"
        assert (
            'pg_hba.conf rejects replication connection for host "127.0.0.1", '
            'user "replicator", no encryption' in plain.stderr
        )
        su = psql(c, "user=postgres dbname=postgres sslmode=disable", "SELECT 1",
                  PASSWORDS["superuser"])  # fmt: skip
        assert su.returncode != 0 and 'user "postgres", database "postgres", no encryption' in (
            su.stderr
        )
        ca = c.root / "pki" / "ca.crt"
        secure = psql(c, f"user=replicator replication=true sslmode=verify-full sslrootcert={ca}",
                      "IDENTIFY_SYSTEM", PASSWORDS["replication"])  # fmt: skip
        assert secure.returncode == 0, secure.stderr
        # The standby, cloned (pg_basebackup) and streaming, checks the primary the same way.
        await primary_with_standbys(c)
        over_tls = await replica_tls(c.address("a"), c.port, "b")
        assert over_tls == ("streaming", True)
        async with await connect(c.address("b"), c.port, "postgres") as conn:
            cur = await conn.execute("SELECT current_setting('primary_conninfo')")
            row = await cur.fetchone()
        assert (
            row is not None
            and f"sslmode=verify-full sslrootcert={c.mgr['b'].layout.tls_ca}" in row[0]
        )


async def replica_tls(host: str, port: int, standby: str) -> tuple[str, bool] | None:
    """The state of ``standby``'s replication connection to ``host`` and whether it is
    over TLS; None while it has none."""
    async with await connect(host, port, "postgres") as conn:
        cur = await conn.execute(
            "SELECT r.state, s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)"
            " WHERE r.application_name = %s",
            (standby,),
        )
        row = await cur.fetchone()
    return None if row is None else (str(row[0]), bool(row[1]))


# ---- the agents ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def db_pair(etcd: Etcd, **database: Any) -> AsyncIterator[tuple[Cluster, int, Path]]:
    root = Path(tempfile.mkdtemp(prefix="hapair-pgsec-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as its own user below this directory
    write_secrets(root)
    port = common_free_port(ADDRESSES)
    c = Cluster(etcd, root)
    nodes = [{"name": n, "address": a} for n, a in zip("ab", ADDRESSES, strict=True)]
    section = {**database_section(root, port, synchronous=True), **database}
    try:
        await c.apply(c.site([{"name": "p", "nodes": nodes, "database": section}]))
        yield c, port, root
    finally:
        await c.stop_all()
        if not os.environ.get("HAPAIR_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


async def streaming_from(port: int, primary: str, standby: str) -> tuple[str, bool] | None:
    state = await replica_tls(primary, port, standby)
    return state if state is not None and state[0] == "streaming" else None


@pytest.mark.e2e
@pytest.mark.long
async def test_a_database_pair_fails_over_with_replication_over_verified_tls(
    etcd: Etcd, store: object
) -> None:
    async with db_pair(etcd) as (c, port, _):
        c.start("a")
        _, epoch = await c.active("p", node="a", timeout=60)
        c.start("b")
        got = await until(lambda: streaming_from(port, "127.0.0.1", "b"), 60, "b streaming")
        assert got == ("streaming", True), "b streams from a in clear"

        async def b_recorded() -> bool:  # only a recorded synchronous standby takes over
            kv = await c.store.get(keys.sync_standby("p"))
            st = None if kv is None else decode(SyncState, kv.value, kv.key)
            return st is not None and st.primary == "a" and st.sync == ["b"]

        await until(b_recorded, 60, "b recorded as the synchronous standby")
        hosts = ",".join(ADDRESSES)
        writer = Writer(
            f"host={hosts} port={port} dbname=mes user=mes password={PASSWORDS['mes']}"
            " target_session_attrs=read-write connect_timeout=2"
        )
        async with await connect("127.0.0.1", port, "mes", dbname="mes") as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")
        writer.start()
        try:
            await until(lambda: _acked(writer, 100), 30, "100 acknowledged commits")
            c.crash("a")  # the agent, its watchdog and PostgreSQL die at the same instant
            await c.active("p", not_epoch=epoch, node="b", timeout=30)
            target = len(writer.acked) + 50
            await until(lambda: _acked(writer, target), 30, "commits on b")
            c.start("a")  # back as b's standby (rewound), over TLS again
            got = await until(lambda: streaming_from(port, "127.0.0.2", "a"), 90, "a streaming")
            assert got == ("streaming", True), "a streams from b in clear"
        finally:
            await writer.stop()
        async with await connect("127.0.0.2", port, "mes", dbname="mes") as conn:
            cur = await conn.execute("SELECT id FROM ticks")
            present = {int(r[0]) for r in await cur.fetchall()}
        assert not set(writer.acked) - present, "acknowledged commits lost"
        async with await connect("127.0.0.1", port, "postgres") as conn:
            cur = await conn.execute("SELECT current_setting('primary_conninfo')")
            row = await cur.fetchone()
        assert row is not None and "host=127.0.0.2" in row[0] and "sslmode=verify-full" in row[0]
        assert "LAB MODE, NO TLS" not in c.log("a") + c.log("b")


async def _acked(writer: Writer, n: int) -> bool:
    return len(writer.acked) >= n


@pytest.mark.e2e
async def test_without_its_certificate_a_node_names_the_missing_file_and_the_lab_switch(
    etcd: Etcd, store: object, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    tls = {
        "ca_file": f"{missing}/ca.crt",
        "cert_file": f"{missing}/postgres@{{node.name}}.crt",
        "key_file": f"{missing}/postgres@{{node.name}}.key",
    }
    async with db_pair(etcd, tls=tls) as (c, _, root):
        c.start("a")
        expected = f"{missing}/ca.crt (database.tls.ca_file): no such file"

        async def named() -> bool:
            return expected in c.log("a")

        await until(named, 30, "a's agent naming the missing CA file")
        line = next(line for line in c.log("a").splitlines() if expected in line)
        assert "database cannot start" in line and "security: none" in line
        assert not list(root.glob("p/a/pg/PG_VERSION")), "a cluster was initialised anyway"


@pytest.mark.e2e
async def test_the_lab_mode_by_name_runs_without_tls_and_says_so(etcd: Etcd, store: object) -> None:
    async with db_pair(etcd, security="none") as (c, port, _):
        c.start("a")
        await c.active("p", node="a", timeout=60)
        c.start("b")
        got = await until(lambda: streaming_from(port, "127.0.0.1", "b"), 60, "b streaming")
        assert got == ("streaming", False)  # in clear, as asked
        for node in ("a", "b"):
            assert "database in the LAB MODE, NO TLS" in c.log(node)
