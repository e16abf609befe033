"""One node's PostgreSQL plumbing shared by the primary and standby paths: its paths,
its programs, the agent's connection to its server, and a start with fresh files.

Every connection to a server (the agent's, the standby's, a clone's, a rewind's)
checks its certificate and name (``sslmode=verify-full``) unless the pair runs in the
lab mode."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from hapair.shared.topology import Node, Pair, placeholder_values
from hapair.workshop_agent.pg import ctl, files, tls
from hapair.workshop_agent.pg import query as q
from hapair.workshop_agent.pg.config import DatabaseConfig
from hapair.workshop_agent.pg.errors import PgError
from hapair.workshop_agent.pg.proc import Runner, running_pid
from hapair.workshop_agent.pg.secrets import Secrets


@dataclass(frozen=True)
class Timeouts:
    """Every wait of the layer is bounded by one of these (seconds)."""

    start_s: float = 60.0  # crash recovery included
    standby_start_s: float = 10.0  # then left starting: status says so
    demote_fast_s: float = 3.0  # fast shutdown, then immediate
    switchover_stop_s: float = 10.0
    promote_s: float = 30.0
    query_s: float = 5.0
    sync_s: float = 5.0  # for restore_sync to see the standby synchronous
    basebackup_s: float = 3600.0
    rewind_s: float = 1800.0


class PgNode:
    """This node's server as the layers below the manager see it."""

    def __init__(
        self,
        config: DatabaseConfig,
        pair: Pair,
        node: Node,
        secrets: Secrets,
        runner: Runner,
        timeouts: Timeouts,
    ) -> None:
        self.config = config
        self.pair = pair
        self.node = node
        self.secrets = secrets
        self.runner = runner
        self.timeouts = timeouts
        values = placeholder_values(pair, node, None)
        self.layout = config.layout(values)
        self.tls = tls.TlsSource.of(config, values)
        self._conn: q.Conn | None = None

    @property
    def name(self) -> str:
        return self.node.name

    def running(self) -> int | None:
        return running_pid(self.layout.data_dir)

    # --- connections ------------------------------------------------------------------

    async def local(self, timeout: float | None = None) -> q.Conn:
        """The agent's connection to its own server, kept between calls; retried while
        the server is starting, for up to ``timeout`` s."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        deadline = time.monotonic() + (timeout or self.timeouts.query_s)
        while True:
            try:
                self._conn = await self.connect(self.node.address)
                return self._conn
            except PgError:
                if time.monotonic() > deadline or self.running() is None:
                    raise
                await asyncio.sleep(0.01)

    async def connect(self, host: str, dbname: str = "postgres") -> q.Conn:
        """A superuser connection to ``host`` (this node or the primary to follow), its
        certificate checked against the CA file the agent reads."""
        auth, timeout = self.config.auth, self.timeouts.query_s
        return await q.connect(
            host,
            self.config.port,
            auth.superuser,
            self.secrets.superuser,
            dbname=dbname,
            timeout=timeout,
            tls=tls.client_params(self.tls.ca if self.tls else None),
        )

    def check_tls(self) -> None:
        """TlsError unless this node's TLS files are usable (none in the lab mode)."""
        if self.tls is not None:
            tls.load(self.tls, self.node.address, self.runner.uid)

    @property
    def run_tls(self) -> dict[str, str]:
        """libpq's TLS settings for the programs run as the database's user: the CA's
        copy in the run dir, which that user may read."""
        return tls.client_params(self.layout.tls_ca if self.tls else None)

    def drop(self) -> None:
        """Forget the connection (the server is going away or it broke)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.pgconn.finish()
        self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = None

    async def in_recovery(self) -> bool | None:
        """Whether the running server is a standby; None if it died as we asked."""
        try:
            return await q.is_in_recovery(await self.local(self.timeouts.start_s))
        except PgError:
            self.drop()
            if self.running() is not None:
                raise
            return None

    # --- files and start ------------------------------------------------------------------

    async def start(
        self, *, standby: bool, upstream: str | None = None, keep_sync: bool = False
    ) -> None:
        """Write every file afresh, then start: a standby following ``upstream`` (none
        before a promotion), or a primary keeping its synchronous standbys if asked."""
        role: dict[str, str] = {}
        if standby:
            role["primary_conninfo"] = self.conninfo(upstream) if upstream else ""
        elif keep_sync:
            auto = files.read_text(self.layout.data_dir / files.AUTO_CONF)
            role["synchronous_standby_names"] = (
                files.auto_conf_value(auto, "synchronous_standby_names") or ""
            )
        self.write_run_files()
        files.write_config(
            self.config,
            self.layout,
            address=self.node.address,
            cluster=f"{self.pair.name}-{self.node.name}",
            node_addresses=[n.address for n in self.pair.nodes],
            role_settings=role,
            standby=standby,
            owner=(self.runner.uid, self.runner.gid),
        )
        self.drop()
        timeout = self.timeouts.standby_start_s if upstream else self.timeouts.start_s
        await ctl.start(self.runner, self.layout, timeout)

    def write_run_files(self) -> None:
        """The password file of replication, clone and rewind connections, and the TLS
        files read afresh (a renewed certificate is served from this start on)."""
        auth, secrets = self.config.auth, self.secrets
        entries = {
            auth.replication_user: secrets.replication.reveal(),
            auth.superuser: secrets.superuser.reveal(),
        }
        text = files.pgpass(self.config.port, entries)
        uid, gid = self.runner.uid, self.runner.gid
        files.write_file(self.layout.passfile, text, uid, gid)
        if self.tls is not None:
            tls.install(tls.load(self.tls, self.node.address, uid), self.layout, uid, gid)

    def conninfo(self, host: str, clone: bool = False) -> str:
        """``primary_conninfo`` for following ``host``, or the clone's. A clone streams
        its WAL under another name: the primary must not take it for this standby (and
        wait for it, or record it synchronous, until the clone ends)."""
        auth = self.config.auth
        name = f"{self.node.name}-clone" if clone else self.node.name
        return files.primary_conninfo(
            host, self.config.port, auth.replication_user, self.layout.passfile, name, self.run_tls
        )

    def rewind_source(self, host: str) -> str:
        """pg_rewind's source: the primary, as superuser, password from the pgpass file."""
        user = self.config.auth.superuser
        parts = {"host": host, "port": str(self.config.port), "user": user}
        parts |= {"dbname": "postgres", "connect_timeout": "5", **self.run_tls}
        return " ".join(f"{k}={files.quote_conninfo(v)}" for k, v in parts.items())
