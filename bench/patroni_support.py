"""Patroni, for the side-by-side benchmark only: a throw-away install and a two-node cluster.

Patroni is installed with pip from PyPI into a venv inside the benchmark's temp dir, which
is removed afterwards: it is never a dependency of hapair and none of its code is kept.
The cluster runs on the same machine as hapair's benchmark, with the same etcd, the same
PostgreSQL 15 and the same PostgreSQL settings as hapair's (``workshop_agent/pg/files.py``):

- node ``a`` on 127.0.0.1, node ``b`` on 127.0.0.2, one PostgreSQL port and one REST API
  port shared by both addresses, each node's Unix socket beside its data dir;
- ``synchronous_mode: true``, ``use_pg_rewind: true``;
- ``ttl 20, loop_wait 1, retry_timeout 3``: the smallest values Patroni's validator
  accepts (``patroni/validator.py``: ``IntValidator(min=20)``, ``min=1``, ``min=3``; and
  ``loop_wait + 2 * retry_timeout <= ttl`` holds).

Patroni and PostgreSQL run as the ``postgres`` user through ``setpriv`` (PostgreSQL refuses
root), so the venv is built from a system Python that user can run, not root's pyenv.
Every process is stopped by PID: Patroni by its ``Popen``, each postmaster (which Patroni
detaches from itself, as ``pg_ctl`` does) by the PID in its ``postmaster.pid``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import yaml

from hapair.workshop_agent.pg.proc import running_pid
from tests.support.cluster import descendants, until
from tests.support.harness import Etcd, stop_pid
from tests.support.pg_harness import PASSWORDS, common_free_port

PATRONI_VERSION = "4.1.5"
# Patroni 4.x: etcd3 talks to etcd's v3 gRPC gateway over HTTP (works with etcd 3.4);
# psycopg3 is the driver Patroni itself uses to reach PostgreSQL.
PATRONI_EXTRAS = "etcd3,psycopg3"
TIMINGS = {"ttl": 20, "loop_wait": 1, "retry_timeout": 3}
OS_USER = "postgres"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
ADDRESS = {"a": "127.0.0.1", "b": "127.0.0.2"}
SCOPE = "bench"
# The same PostgreSQL settings hapair's agents write (workshop_agent/pg/files.py and the
# benchmark's database section), so only the manager differs.
PG_PARAMETERS: dict[str, Any] = {
    "max_connections": 50,
    "shared_buffers": "32MB",
    "wal_level": "replica",
    "wal_log_hints": "on",
    "hot_standby": "on",
    "max_wal_senders": 10,
    "wal_keep_size": "512MB",
    "wal_retrieve_retry_interval": "100ms",
    "password_encryption": "scram-sha-256",
}
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


class PatroniError(RuntimeError):
    """Patroni could not be installed, or its cluster did not reach a state in time."""


def as_os_user(cmd: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", *cmd]


def _python_for_os_user() -> str:
    """A Python 3.8+ with ``venv`` that the ``postgres`` user can run."""
    base = getattr(sys, "_base_executable", sys.executable)
    for candidate in (*SYSTEM_PYTHONS, shutil.which("python3") or "", base):
        if not candidate or not os.path.exists(candidate):
            continue
        check = "import sys, venv, ensurepip; assert sys.version_info >= (3, 8)"
        with contextlib.suppress(subprocess.TimeoutExpired):
            done = subprocess.run(
                as_os_user([candidate, "-c", check]), capture_output=True, timeout=30
            )
            if done.returncode == 0:
                return candidate
    raise PatroniError(
        f"no Python with venv that the {OS_USER} user can run (tried {SYSTEM_PYTHONS}, "
        "python3 on PATH and this interpreter's base); install python3-venv"
    )


def install_patroni(root: Path, version: str = PATRONI_VERSION, timeout: float = 600) -> Path:
    """Install ``patroni[etcd3,psycopg3]==version`` from PyPI into ``root/patroni-venv``;
    return the venv's bin dir. Only this temp dir is touched."""
    venv = root / "patroni-venv"
    python = _python_for_os_user()
    steps = [
        [python, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            f"patroni[{PATRONI_EXTRAS}]=={version}",
        ],
    ]
    deadline = time.monotonic() + timeout
    for cmd in steps:
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired as err:
            raise PatroniError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from err
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise PatroniError(f"{' '.join(cmd)} failed ({done.returncode}):\n{tail}")
    subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True, timeout=60)
    bin_dir = venv / "bin"
    out = subprocess.run(
        as_os_user([str(bin_dir / "patroni"), "--version"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0 or version not in out.stdout:
        raise PatroniError(f"patroni --version: {out.stdout.strip()} {out.stderr.strip()}")
    return bin_dir


def _chown(path: Path) -> None:
    shutil.chown(path, OS_USER, OS_USER)


@dataclass
class PatroniNode:
    name: str
    address: str
    home: Path  # config, log, socket dir and data dir, owned by the postgres user
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_file(self) -> Path:
        return self.home / "patroni.yml"

    def postmaster_pid(self) -> int | None:
        """The live postmaster serving this node's data dir (never a reused PID)."""
        return running_pid(self.data_dir)


@dataclass
class PatroniCluster:
    """Two Patroni nodes (``a`` and ``b``) of one scope against ``etcd``."""

    root: Path
    bin_dir: Path
    etcd: Etcd
    pg_port: int = 0
    api_port: int = 0
    nodes: dict[str, PatroniNode] = field(default_factory=dict)
    killed: list[int] = field(default_factory=list)  # every PID a crash killed

    def __post_init__(self) -> None:
        addresses = tuple(ADDRESS.values())
        self.pg_port = self.pg_port or common_free_port(addresses)
        self.api_port = self.api_port or common_free_port(addresses)
        for name, address in ADDRESS.items():
            home = self.root / name
            home.mkdir(mode=0o700)
            (home / "run").mkdir(mode=0o700)
            for path in (home, home / "run"):
                _chown(path)
            node = PatroniNode(name, address, home)
            node.config_file.write_text(yaml.safe_dump(self._config(node), sort_keys=False))
            node.config_file.chmod(0o600)
            _chown(node.config_file)
            self.nodes[name] = node

    # -- configuration ------------------------------------------------------------------
    def _config(self, node: PatroniNode) -> dict[str, Any]:
        api = f"{node.address}:{self.api_port}"
        pg = f"{node.address}:{self.pg_port}"
        return {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": api, "connect_address": api},
            "etcd3": {"hosts": [f"{self.etcd.host}:{self.etcd.client_port}"]},
            "bootstrap": {
                "dcs": {
                    **TIMINGS,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": PG_PARAMETERS,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, "data-checksums"],
            },
            "postgresql": {
                "listen": pg,
                "connect_address": pg,
                "data_dir": str(node.data_dir),
                "bin_dir": str(PG_BIN),
                "pgpass": str(node.home / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": PASSWORDS["superuser"]},
                    "replication": {
                        "username": "replicator",
                        "password": PASSWORDS["replication"],
                    },
                },
                "parameters": {"unix_socket_directories": str(node.home / "run")},
                "pg_hba": [
                    "local all postgres peer",
                    "host replication replicator 127.0.0.0/8 scram-sha-256",
                    "host all all 127.0.0.0/8 scram-sha-256",
                ],
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
        }

    def conninfo(self, name: str | None = None, superuser: bool = False) -> str:
        hosts = ADDRESS[name] if name else ",".join(ADDRESS.values())
        user, password, db = (
            ("postgres", PASSWORDS["superuser"], "postgres")
            if superuser
            else ("mes", PASSWORDS["mes"], "mes")
        )
        extra = "" if name else " target_session_attrs=read-write"
        return (
            f"host={hosts} port={self.pg_port} dbname={db} user={user} password={password}"
            f" connect_timeout=2{extra}"
        )

    # -- processes ----------------------------------------------------------------------
    def start(self, name: str) -> None:
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            raise PatroniError(f"Patroni {name} is already running (PID {node.proc.pid})")
        if node.log is None:
            node.log = (node.home.parent / f"patroni-{name}.log").open("ab")
        env = {
            "PATH": f"{self.bin_dir}:{PG_BIN}:/usr/bin:/bin",
            "HOME": str(node.home),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        node.proc = subprocess.Popen(
            as_os_user([str(self.bin_dir / "patroni"), str(node.config_file)]),
            cwd=node.home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=node.log,
            stderr=subprocess.STDOUT,
        )

    def crash(self, name: str) -> list[int]:
        """A server crash: Patroni, its postmaster and every backend die at the same
        instant (all frozen first, so none reacts to the others dying, then killed)."""
        node = self.nodes[name]
        assert node.proc is not None, f"Patroni {name} is not running"
        pids = [node.proc.pid, *descendants(node.proc.pid)]
        postmaster = node.postmaster_pid()
        if postmaster is not None:
            pids += [postmaster, *descendants(postmaster)]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(5)
        self.killed.extend(pids)
        return pids

    async def wait_gone(self, pids: list[int], timeout: float) -> None:
        """Until none of ``pids`` exists any more (zombies included), at most ``timeout``."""

        async def gone() -> bool:
            return not any(_exists(p) for p in pids)

        with contextlib.suppress(AssertionError):  # then Patroni copes with what is left
            await until(gone, timeout, "killed processes reaped", step=0.05)

    def stop_all(self) -> None:
        """Patroni by PID (SIGTERM stops its PostgreSQL too), then any postmaster left,
        found again through its data dir so that a PID reused meanwhile is never hit."""
        for node in self.nodes.values():
            if node.proc is None:
                continue
            children = descendants(node.proc.pid)
            stop_pid(node.proc, signal.SIGTERM, 30.0)
            for child in children:
                if alive(child):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
        for node in self.nodes.values():
            postmaster = node.postmaster_pid()
            if postmaster is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown: nothing to keep
            deadline = time.monotonic() + 5
            while node.postmaster_pid() == postmaster and time.monotonic() < deadline:
                time.sleep(0.02)
            if node.postmaster_pid() == postmaster:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(postmaster, signal.SIGKILL)
        for node in self.nodes.values():
            if node.log is not None:
                node.log.close()
                node.log = None

    # -- REST API and views -------------------------------------------------------------
    async def cluster_view(self) -> dict[str, Any] | None:
        """``GET /cluster`` from the first node that answers."""
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for address in ADDRESS.values():
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    url = f"http://{address}:{self.api_port}/cluster"
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            view: dict[str, Any] = await resp.json()
                            return view
        return None

    async def dynamic_config(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(f"http://{ADDRESS['a']}:{self.api_port}/config") as resp,
        ):
            config: dict[str, Any] = await resp.json()
            return config

    async def switchover(self, leader: str, candidate: str, timeout: float = 60) -> str:
        """``POST /switchover`` to the leader; Patroni answers once it is over (it polls
        the outcome every second, so the answer comes later than the hand-over)."""
        url = f"http://{ADDRESS[leader]}:{self.api_port}/switchover"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.post(url, json={"leader": leader, "candidate": candidate}) as resp,
        ):
            text = await resp.text()
            if resp.status != 200:
                raise PatroniError(f"switchover {leader} -> {candidate}: {resp.status} {text}")
            return text

    async def leader(self) -> str | None:
        view = await self.cluster_view()
        for member in (view or {}).get("members", []):
            if member.get("role") == "leader" and member.get("state") == "running":
                return str(member["name"])
        return None

    async def wait_leader(self, name: str, timeout: float) -> None:
        async def ok() -> bool:
            return await self.leader() == name

        await until(ok, timeout, f"Patroni {name} leader", step=0.05)

    async def wait_synced(self, primary: str, standby: str, timeout: float) -> None:
        """``primary`` leads, ``standby`` is Patroni's synchronous standby, streams, and the
        primary's PostgreSQL really waits for it (``sync_state = 'sync'``)."""

        async def ok() -> bool:
            view = await self.cluster_view()
            members = {m["name"]: m for m in (view or {}).get("members", [])}
            p, s = members.get(primary, {}), members.get(standby, {})
            if not (
                p.get("role") == "leader"
                and p.get("state") == "running"
                and s.get("role") == "sync_standby"
                and s.get("state") == "streaming"
            ):
                return False
            async with await psycopg.AsyncConnection.connect(
                self.conninfo(primary, superuser=True), autocommit=True
            ) as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_replication"
                    " WHERE application_name = %s AND sync_state = 'sync'",
                    (standby,),
                )
                row = await cur.fetchone()
                return row is not None and int(row[0]) == 1

        await until(ok, timeout, f"Patroni {standby} synchronous standby of {primary}", step=0.1)

    async def create_app_database(self, primary: str) -> None:
        """The ``mes`` role and database and the ``ticks`` table, as hapair's bench has."""
        async with await psycopg.AsyncConnection.connect(
            self.conninfo(primary, superuser=True), autocommit=True
        ) as conn:
            cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mes'")
            if await cur.fetchone() is None:
                await conn.execute(f"CREATE ROLE mes LOGIN PASSWORD '{PASSWORDS['mes']}'")
            cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = 'mes'")
            if await cur.fetchone() is None:
                await conn.execute("CREATE DATABASE mes OWNER mes")
        async with await psycopg.AsyncConnection.connect(
            self.conninfo(primary), autocommit=True
        ) as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")

    async def ids_on(self, name: str) -> set[int]:
        async with await psycopg.AsyncConnection.connect(self.conninfo(name)) as conn:
            cur = await conn.execute("SELECT id FROM ticks")
            return {int(r[0]) for r in await cur.fetchall()}

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in self.nodes:
            path = self.root / f"patroni-{name}.log"
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- Patroni {name} ({path}) ---\n" + "\n".join(tail))
        return "\n".join(out)


def _exists(pid: int) -> bool:
    """Exists, zombies included."""
    return os.path.exists(f"/proc/{pid}")


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0] != "Z"
