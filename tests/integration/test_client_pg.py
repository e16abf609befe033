"""The PostgreSQL adapter against a real PostgreSQL 15 whose endpoint record moves.

One server listens on both fake nodes' addresses (127.0.0.11 and 127.0.0.12, the same
port), so ``inet_server_addr()`` tells which endpoint a connection went to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hapair.shared.client import Backoff, DeadlineExceeded, OutcomeUnknown, PgAdapter, Resolver
from hapair.shared.store import Store
from tests.support.client_lab import registry_in_process, until
from tests.support.harness import Etcd, wait_for
from tests.support.site_records import FakeAgent, apply_site

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ADDRESSES = ("127.0.0.11", "127.0.0.12")
SERVICE = "db"


def _unavailable() -> str | None:
    if not (PG_BIN / "postgres").exists():
        return f"no PostgreSQL 15 in {PG_BIN}"
    if os.geteuid() != 0:
        return "PostgreSQL is started as the postgres user through setpriv: run as root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user (useradd --system --user-group postgres)"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def as_postgres(*argv: str) -> list[str]:
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]


def port_free_on_both() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((ADDRESSES[0], 0))
            port = int(s.getsockname()[1])
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind((ADDRESSES[1], port))
            return port
    raise RuntimeError("no port free on both addresses")


def _accepts(port: int) -> bool:
    with psycopg.connect(host=ADDRESSES[0], port=port, user="postgres", dbname="postgres"):
        return True


@pytest.fixture(scope="module")
def postgres() -> Iterator[int]:
    """A throw-away PostgreSQL on both addresses; its port. Stopped by PID."""
    root = Path(tempfile.mkdtemp(prefix="hapair-client-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    shutil.chown(root, "postgres", "postgres")
    shutil.chown(sockets, "postgres", "postgres")
    root.chmod(0o700)
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            as_postgres(
                *(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"),
                *("-E", "UTF8", "--no-sync"),
            ),
            check=True,
            capture_output=True,
        )
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 127.0.0.0/8 trust\n")
        port = port_free_on_both()
        proc = subprocess.Popen(
            as_postgres(
                *(str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port)),
                *("-c", f"listen_addresses={','.join(ADDRESSES)}", "-c", "fsync=off"),
                *("-c", f"unix_socket_directories={sockets}"),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _accepts(port), 15, "PostgreSQL to accept connections")
        yield port
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def database(etcd: Etcd, store: Store, port: int) -> AsyncIterator[Any]:
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    b = await FakeAgent(store, "asm-b", "asm").up()
    await a.become_active()
    await a.publish(SERVICE, port, "postgresql")
    async with (
        registry_in_process(etcd) as url,
        Resolver(url, request_timeout_s=0.5) as resolver,
        adapter(resolver) as pg,
    ):
        yield pg, a, b


def adapter(resolver: Resolver) -> PgAdapter:
    return PgAdapter(
        resolver,
        SERVICE,
        user="postgres",
        dbname="postgres",
        deadline_s=5.0,
        backoff=Backoff(initial_s=0.02, max_s=0.2),
    )


async def move(old: FakeAgent, new: FakeAgent, port: int) -> None:
    """The active crashes, the other node takes the database endpoint."""
    await old.crash()
    await old.up()
    await new.become_active()
    await new.publish(SERVICE, port, "postgresql")


async def server_address(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute("SELECT host(inet_server_addr())")
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_pg_connection_follows_the_database_endpoint(
    etcd: Etcd, store: Store, postgres: int
) -> None:
    async with database(etcd, store, postgres) as (pg, a, b):
        assert await pg.run(server_address) == "127.0.0.11"
        first = await pg.connection()

        # An idle connection to the old endpoint is closed the moment it moves.
        await move(a, b, postgres)
        await until(lambda: _closed(first), "the old connection closed")
        assert await pg.run(server_address) == "127.0.0.12"

        # A query running when it moves is left to finish; the next use moves.
        async def slow(conn: psycopg.AsyncConnection[Any]) -> str:
            await conn.execute("SELECT pg_sleep(0.5)")
            return await server_address(conn)

        busy = await pg.connection()
        running = asyncio.create_task(pg.run(slow))
        await asyncio.sleep(0.15)
        await move(b, a, postgres)
        assert await running == "127.0.0.12"
        assert await pg.run(server_address) == "127.0.0.11"
        assert busy.closed


async def _closed(conn: psycopg.AsyncConnection[Any]) -> bool:
    return conn.closed


async def test_pg_run_goes_on_when_the_server_drops_the_connection(
    etcd: Etcd, store: Store, postgres: int
) -> None:
    async with database(etcd, store, postgres) as (pg, _, _):

        async def backend_pid(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        pid = await pg.run(backend_pid)
        async with await psycopg.AsyncConnection.connect(
            host=ADDRESSES[0], port=postgres, user="postgres", dbname="postgres", autocommit=True
        ) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # The first use finds the connection dead and runs the work again on a new one.
        started = time.monotonic()
        assert await pg.run(backend_pid) != pid
        assert time.monotonic() - started < 2.5


async def test_pg_deadline_when_the_database_is_not_there(etcd: Etcd, store: Store) -> None:
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    await a.become_active()
    await a.publish(SERVICE, port_free_on_both(), "postgresql")
    async with (
        registry_in_process(etcd) as url,
        Resolver(url) as resolver,
        PgAdapter(resolver, SERVICE, user="postgres", deadline_s=0.5) as pg,
    ):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"last tried asm-a at 127\.0\.0\.11:.*refused"):
            await pg.connection()
        assert time.monotonic() - started < 1.5


class CommitCutter:
    """A relay to PostgreSQL that loses the answer to the first COMMIT: it passes the
    COMMIT on, waits for the server's answer (the transaction is committed then),
    and drops the client's connection instead of passing the answer back."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host, self.target_port = host, target_port
        self.armed = True
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CommitCutter:
        self.server = await asyncio.start_server(self._relay, self.host, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(ADDRESSES[0], self.target_port)
        committing = asyncio.Event()

        async def up() -> None:
            while data := await reader.read(65536):
                if self.armed and b"COMMIT\x00" in data:
                    self.armed = False
                    committing.set()
                up_writer.write(data)
                await up_writer.drain()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if committing.is_set():
                    writer.transport.abort()  # the answer to COMMIT is lost
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        with contextlib.suppress(OSError):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        writer.transport.abort()
        up_writer.close()


async def test_a_lost_commit_is_run_again_by_run_and_never_by_run_once(
    etcd: Etcd, store: Store, postgres: int
) -> None:
    """``run`` is at least once: a transaction whose COMMIT answer is lost is run
    again (here: applied twice). ``run_once`` is at most once: it raises
    ``OutcomeUnknown`` and does not run it again."""
    async with await psycopg.AsyncConnection.connect(
        host=ADDRESSES[0], port=postgres, user="postgres", dbname="postgres", autocommit=True
    ) as admin:
        await admin.execute("DROP TABLE IF EXISTS orders")
        await admin.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text)")

        async def count(item: str) -> int:
            cur = await admin.execute("SELECT count(*) FROM orders WHERE item = %s", (item,))
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        def insert(item: str) -> Any:
            async def transaction(conn: psycopg.AsyncConnection[Any]) -> None:
                async with conn.transaction():
                    await conn.execute("INSERT INTO orders (item) VALUES (%s)", (item,))

            return transaction

        await apply_site(store)
        c = await FakeAgent(store, "asm-c", "asm").up()
        await c.become_active()
        async with contextlib.AsyncExitStack() as stack:
            cutter = await stack.enter_async_context(CommitCutter("127.0.0.13", postgres))
            await c.publish(SERVICE, cutter.port, "postgresql")
            url = await stack.enter_async_context(registry_in_process(etcd))
            resolver = await stack.enter_async_context(Resolver(url, request_timeout_s=0.5))
            pg = await stack.enter_async_context(adapter(resolver))
            await pg.run(insert("run"))
            assert not cutter.armed
            assert await count("run") == 2  # what "at least once" means

            cutter.armed = True
            with pytest.raises(OutcomeUnknown, match="may or may not have been applied"):
                await pg.run_once(insert("run_once"))
            assert await count("run_once") == 1
            # The next call goes on, on a new connection.
            await pg.run_once(insert("after"))
            assert await count("after") == 1
