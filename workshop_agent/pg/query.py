"""The SQL the agent runs, with psycopg (async), each round trip bounded in time.

A query that outlives its budget (a frozen server) has its socket shut down, so it
fails at once instead of waiting for psycopg's own cancellation (up to 10 s). A
timeout never means "not committed": a commit waiting for a synchronous standby is
already committed locally.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from hapair.workshop_agent.pg.errors import PgError
from hapair.workshop_agent.pg.secrets import Secret
from hapair.workshop_agent.pg.status import Replica, TimelineSwitch, parse_history, parse_lsn

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
T = TypeVar("T")
POLL_S = 0.005
QUERY_S = 5.0


_BUDGETS: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()


def budget(conn: Conn) -> float:
    """How long one round trip on ``conn`` may take (set at connect)."""
    return _BUDGETS.get(conn, QUERY_S)


async def connect(
    host: str,
    port: int,
    user: str,
    password: Secret,
    *,
    dbname: str = "postgres",
    timeout: float = QUERY_S,
    tls: Mapping[str, str] | None = None,
) -> Conn:
    """An autocommit connection whose round trips are bounded by ``timeout`` as its
    making is; PgError naming the server when it cannot be made. ``tls``: libpq's TLS
    settings (``sslmode``, ``sslrootcert``)."""
    try:
        async with asyncio.timeout(timeout):
            conn = await psycopg.AsyncConnection.connect(
                make_conninfo("", **(tls or {})),
                host=host,
                port=port,
                user=user,
                password=password.reveal(),
                dbname=dbname,
                autocommit=True,
                connect_timeout=max(2, round(timeout)),  # libpq's minimum is 2 s
                application_name="hapair-agent",
            )
    except (psycopg.Error, TimeoutError) as err:
        detail = str(err).strip() or f"no answer within {timeout:g} s"
        raise PgError("connect", f"{user}@{host}:{port}: {detail}") from None
    _BUDGETS[conn] = timeout
    return conn


def _sever(conn: Conn) -> None:
    """Shut the connection's socket down (not close it: the fd stays psycopg's)."""
    with contextlib.suppress(Exception):
        dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
        dup.shutdown(socket.SHUT_RDWR)
        dup.close()


async def bounded(conn: Conn, work: Awaitable[T], timeout: float, step: str) -> T:
    """``work`` on ``conn`` within ``timeout`` s, or PgError with the connection broken."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            _sever(conn)
            await asyncio.wait({task}, timeout=1.0)
            task.cancel()
    if not done:
        raise PgError(step, f"no answer within {timeout:g} s")
    try:
        return task.result()
    except psycopg.Error as err:
        raise PgError(step, str(err).strip() or type(err).__name__) from None


async def rows(
    conn: Conn,
    query: str | sql.Composed,
    params: Sequence[Any] = (),
    *,
    step: str,
    timeout: float | None = None,
) -> list[tuple[Any, ...]]:
    """The rows of one statement, within ``timeout`` (else the connection's budget)."""

    async def go() -> list[tuple[Any, ...]]:
        cur = await conn.execute(query, params or None)
        return await cur.fetchall() if cur.description else []

    return await bounded(conn, go(), timeout or budget(conn), step)


async def one(
    conn: Conn, query: str, params: Sequence[Any] = (), *, step: str, timeout: float | None = None
) -> tuple[Any, ...]:
    result = await rows(conn, query, params, step=step, timeout=timeout)
    if not result:
        raise PgError(step, "no row returned")
    return result[0]


# --- position and replication ---------------------------------------------------------

_TIMELINE = "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"


async def is_in_recovery(conn: Conn) -> bool:
    return bool((await one(conn, "SELECT pg_is_in_recovery()", step="is_in_recovery"))[0])


@dataclass(frozen=True)
class PrimaryPosition:
    timeline: int
    lsn: int
    sync_names: str


async def primary_position(conn: Conn) -> PrimaryPosition:
    tli, lsn, names = await one(
        conn,
        f"SELECT {_TIMELINE}, pg_current_wal_flush_lsn()::text,"
        " current_setting('synchronous_standby_names')",
        step="primary position",
    )
    return PrimaryPosition(int(tli), parse_lsn(lsn), str(names))


@dataclass(frozen=True)
class StandbyPosition:
    timeline: int
    receive_lsn: int | None
    replay_lsn: int | None
    streaming: bool
    upstream: str | None
    upstream_lsn: int | None  # the primary's end of WAL, as last reported to us
    replay_age_s: float | None


async def standby_position(conn: Conn) -> StandbyPosition:
    row = await one(
        conn,
        "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,"
        " r.status, r.sender_host, r.latest_end_lsn::text,"
        " GREATEST(r.received_tli, c.timeline_id, rc.min_recovery_end_timeline),"
        " extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
        " FROM pg_control_checkpoint() c CROSS JOIN pg_control_recovery() rc"
        " LEFT JOIN pg_stat_wal_receiver r ON true",
        step="standby position",
    )
    receive, replay, status, sender, latest, tli, age = row

    def lsn(text: str | None) -> int | None:
        return parse_lsn(text) if text else None

    return StandbyPosition(
        int(tli), lsn(receive), lsn(replay), status == "streaming", sender, lsn(latest), age
    )


async def replicas(conn: Conn) -> list[Replica]:
    result = await rows(
        conn,
        "SELECT application_name, client_addr::text, state, sent_lsn::text, flush_lsn::text,"
        " replay_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,"
        " extract(epoch FROM replay_lag)::float8, sync_state"
        " FROM pg_stat_replication WHERE state <> 'backup' ORDER BY application_name",
        step="pg_stat_replication",
    )
    out = []
    for name, addr, state, sent, flush, replay, lag_bytes, lag_s, sync_state in result:
        if lag_s is None and lag_bytes == 0:
            lag_s = 0.0  # idle: PostgreSQL reports no lag time at all
        out.append(
            Replica(
                name=name,
                address=addr,
                state=state,
                sent_lsn=sent,
                flush_lsn=flush,
                replay_lsn=replay,
                lag_bytes=lag_bytes,
                lag_s=lag_s,
                sync_state=sync_state,
            )
        )
    return out


async def set_sync_names(conn: Conn, value: str, timeout: float | None = None) -> None:
    """ALTER SYSTEM + reload, then wait until this session sees the new value."""
    step = "set synchronous_standby_names"
    alter = sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value))
    await rows(conn, alter, step=step)
    await rows(conn, "SELECT pg_reload_conf()", step=step)
    limit = timeout or budget(conn)
    deadline = time.monotonic() + limit
    show = "SELECT current_setting('synchronous_standby_names')"
    while (await one(conn, show, step=step))[0] != value:
        if time.monotonic() > deadline:
            raise PgError(step, f"the server did not take {value!r} within {limit:g} s")
        await asyncio.sleep(POLL_S)


async def set_primary_conninfo(conn: Conn, value: str) -> None:
    """Follow another primary without a restart (reloadable since PostgreSQL 13)."""
    alter = sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(value))
    await rows(conn, alter, step="set primary_conninfo")
    await rows(conn, "SELECT pg_reload_conf()", step="set primary_conninfo")


async def wait_sync(conn: Conn, names: Sequence[str], timeout: float) -> list[str]:
    """Wait until each of ``names`` is a synchronous (or quorum) standby; those that are."""
    deadline = time.monotonic() + timeout
    while True:
        sync = [r.name for r in await replicas(conn) if r.sync_state in ("sync", "quorum")]
        if set(names) <= set(sync) or time.monotonic() > deadline:
            return [n for n in names if n in sync]
        await asyncio.sleep(POLL_S * 4)


async def wait_writable(
    conn: Conn,
    timeout: float,
    nudge: Callable[[], object] | None = None,
    nudge_every_s: float = 0.005,
) -> None:
    """A promoted standby says "ready" long before it is a primary: wait for that,
    calling ``nudge`` every ``nudge_every_s`` meanwhile."""
    deadline = time.monotonic() + timeout
    nudged = time.monotonic()
    while await is_in_recovery(conn):
        now = time.monotonic()
        if now > deadline:
            raise PgError("wait for writes", f"still in recovery after {timeout:g} s")
        if nudge is not None and now - nudged >= nudge_every_s:
            nudge()
            nudged = now
        await asyncio.sleep(POLL_S / 5)


async def checkpoint(conn: Conn, timeout: float = 60) -> None:
    await rows(conn, "CHECKPOINT", step="CHECKPOINT", timeout=timeout)


async def history(conn: Conn) -> tuple[int, list[TimelineSwitch]]:
    """A primary's timeline and its history file (superuser: pg_read_file)."""
    (tli,) = await one(conn, f"SELECT {_TIMELINE}", step="timeline history")
    if tli == 1:
        return 1, []
    (text,) = await one(
        conn, "SELECT pg_read_file(%s)", (f"pg_wal/{tli:08X}.history",), step="timeline history"
    )
    return int(tli), parse_history(text)


async def system_id(conn: Conn) -> str:
    return str(
        (
            await one(
                conn, "SELECT system_identifier::text FROM pg_control_system()", step="system id"
            )
        )[0]
    )


# --- roles and databases ----------------------------------------------------------------


def scram_matches(verifier: str | None, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier was made from ``password`` (ASCII)."""
    try:
        method, rest = (verifier or "").split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt = iter_salt.split(":", 1)
        stored_key = base64.b64decode(keys.split(":", 1)[0])
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(salt), int(iterations)
        )
    except ValueError:
        return False
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return method == "SCRAM-SHA-256" and hmac.compare_digest(
        hashlib.sha256(client_key).digest(), stored_key
    )


async def ensure_role(
    conn: Conn,
    name: str,
    password: Secret,
    *,
    replication: bool = False,
    check_password: bool = True,
) -> bool:
    """Create a login role, or (``check_password``) set its password if it no longer
    matches; True if changed. The server only ever sees the SCRAM verifier."""
    step = f"role {name}"
    found = await rows(
        conn, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,), step=step
    )
    if found and (not check_password or scram_matches(found[0][0], password.reveal())):
        return False
    verifier = conn.pgconn.encrypt_password(
        password.reveal().encode(), name.encode(), b"scram-sha-256"
    )
    verb = (
        "ALTER ROLE {} WITH LOGIN {} PASSWORD {}"
        if found
        else "CREATE ROLE {} WITH LOGIN {} PASSWORD {}"
    )
    query = sql.SQL(verb).format(
        sql.Identifier(name),
        sql.SQL("REPLICATION" if replication else ""),
        sql.Literal(verifier.decode()),
    )
    await rows(conn, query, step=step)
    return True


async def ensure_database(conn: Conn, name: str, owner: str) -> bool:
    """Create the database if missing; True if created."""
    step = f"database {name}"
    if await rows(conn, "SELECT 1 FROM pg_database WHERE datname = %s", (name,), step=step):
        return False
    query = sql.SQL("CREATE DATABASE {} OWNER {}").format(
        sql.Identifier(name), sql.Identifier(owner)
    )
    await rows(conn, query, step=step, timeout=60)
    return True
