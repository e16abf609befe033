"""A site under test: real etcd, real agent processes, a recording test service."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hapair.registry.console.drill_faults import descendants
from hapair.shared import keys, pki
from hapair.shared.clock import boottime
from hapair.shared.records import EndpointRecord, Leader, NodeStatus, TopologyDoc, decode
from hapair.shared.store import Kv, Store, Timeout, Unavailable
from hapair.shared.topology import parse_site
from hapair.workshop_agent import cgroups
from tests.support.harness import PYTHON, ROOT, Etcd, stop_pid, wait_for
from tests.support.harness import until as until  # re-exported: the tests wait with it
from tests.support.pg_harness import with_tls
from tests.support.tls_etcd import TestPki

T = TypeVar("T")
SVC = str(ROOT / "tests" / "support" / "svc.py")
# The agent's and the watchdog's log lines that bound a service run, and what each is.
RUN_EVENTS = {
    'event="service started"': "forked",
    'event="service ended"': "ended",
    'event="service gone"': "ended",
    'event="cgroup emptied"': "ended",
}
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
AGENT = [PYTHON, "-m", "hapair.workshop_agent.main"]
# A service gets nothing of its agent's environment: one that imports this tree's code
# (not the one installed in the environment) declares where it is, as a site file would.
THIS_TREE = {"PYTHONPATH": str(ROOT)}


def _cgroup(path: str) -> str:
    """A cgroup as both sides name it: the agent logs its full path, a process reads
    its path below the hierarchy's mount; the run's own directory names are unique."""
    return "/".join(path.rstrip("/").split("/")[-2:])


OBSERVER_RETRY_S = 10.0


async def _observed(read: Callable[[], Awaitable[T]]) -> T:
    """A test's own read of etcd, retried while etcd cannot serve it (a member elects a
    leader after a restart, or was just cut off): the agents are what a test checks, not
    the reader's luck with the member it asked. A refused or malformed answer fails."""
    deadline = time.monotonic() + OBSERVER_RETRY_S
    while True:
        try:
            return await read()
        except (Unavailable, Timeout):
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.1)


async def holds(cond: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Assert that ``cond`` stays true for ``seconds`` (for things that must NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await cond(), what
        await asyncio.sleep(0.1)


def recording_service(
    name: str, port: int, record: Path, *, bind: str = "{node.address}", **extra: Any
) -> dict[str, Any]:
    """The test service (svc.py) that records its runs in ``record``, listening on ``bind``."""
    return {
        "name": name,
        "command": [
            PYTHON,
            SVC,
            "--service",
            name,
            "--pair",
            "{pair.name}",
            "--node",
            "{node.name}",
            "--epoch",
            "{epoch}",
            "--bind",
            bind,
            "--port",
            str(port),
            "--record",
            str(record),
        ],
        "health": {
            "http": f"http://{{node.address}}:{port}/",
            "interval_s": 0.2,
            "timeout_s": 1.0,
            "failures": 2,
        },
        "endpoint": {"port": port, "protocol": "http"},
        **extra,
    }


def with_peer_keys(site: dict[str, Any], test_pki: TestPki) -> dict[str, Any]:
    """``site`` with each pair that has a peer path (a ``network:`` section) but names no
    ``peer_key_file`` given its key of ``test_pki``: the secure default. A pair without
    a peer path has nothing to authenticate; one that names a key, or none on purpose
    (``peer_key_file: None``), keeps it."""
    site = copy.deepcopy(site)
    for workshop in site.get("workshops", []):
        for pair in workshop.get("pairs", []):
            network = pair.get("network")
            if network is not None and "peer_key_file" not in network:
                network["peer_key_file"] = str(test_pki.peer_key(pair["name"]))
    return site


def with_database_tls(site: dict[str, Any], test_pki: TestPki | None) -> dict[str, Any]:
    """``site`` with each database that names neither TLS files nor ``security`` given
    certificates of ``test_pki`` for its nodes' addresses: the secure default; with no
    PKI (the lab mode) it says ``security: none``."""
    site = copy.deepcopy(site)
    for workshop in site.get("workshops", []):
        for pair in workshop.get("pairs", []):
            db = pair.get("database")
            if db is None or "tls" in db or "security" in db:
                continue
            if test_pki is None:
                db["security"] = "none"
            else:
                addresses = [n["address"] for n in pair.get("nodes", [])]
                pair["database"] = with_tls(db, test_pki, addresses)
    return site


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Cluster:
    """Agents as real processes against ``etcd``; each one made is in ``MADE`` until the
    next test starts, so a failure report can show what its agents logged."""

    etcd: Etcd
    tmp: Path
    store: Store = field(init=False)
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    record: Path = field(init=False)
    # etcd over TLS (one given a PKI, the tests' default): the test's store shows the
    # admin's certificate, each agent its node's, and each pair with a peer path that the
    # site applies without a key gets one of the test's PKI. The lab mode gets neither.
    peer_keys: bool = True
    # The tests' services run as root (the test's own user, with files in its temporary
    # directory): every agent of a test cluster is told so explicitly, with the option a
    # server needs for it (--allow-root-services), unless a test turns it off.
    allow_root_services: bool = True

    def __post_init__(self) -> None:
        # Some tests hand in an etcd cluster of their own (harness.EtcdCluster): its URL
        # lists every member, its TLS files are one member's.
        self.store = Store(self.etcd.url, timeout=2.0, tls=self.etcd.tls)
        self.record = self.tmp / "record"
        self.record.mkdir(exist_ok=True)
        MADE.append(self)

    def log_tails(self, lines: int) -> list[tuple[str, str]]:
        """(agent, its last ``lines`` lines above debug) for each agent started."""
        tails = []
        for node in self.agents:
            try:
                said = [ln for ln in self.log(node).splitlines() if "level=debug" not in ln]
            except OSError as err:
                said = [f"(no log: {err})"]
            tails.append((node, "\n".join(said[-lines:])))
        return tails

    # -- topology ---------------------------------------------------------------------
    async def apply(self, site: dict[str, Any]) -> None:
        if self.peer_keys and self.etcd.pki is not None:
            site = with_peer_keys(site, self.etcd.pki)
        site = with_database_tls(site, self.etcd.pki)
        parsed = parse_site(site, "test site")
        await self.store.put(
            keys.TOPOLOGY, TopologyDoc(site=parsed.model_dump(mode="json")).encode()
        )

    def service_env(self, service: str, nodes: list[str]) -> dict[str, str]:
        """The ``env:`` a service that talks to etcd needs besides what its agent gives it
        (the CA): over TLS its own certificate, ``SERVICE@NODE`` on each node."""
        if self.etcd.pki is None:
            return {}
        for node in nodes:
            self.etcd.pki.files(f"{service}@{node}", pki.Kind.COMM)
        own = self.etcd.pki.dir / f"{service}@{{node.name}}"
        return {"HAPAIR_ETCD_CERT": f"{own}.crt", "HAPAIR_ETCD_KEY": f"{own}.key"}

    @staticmethod
    def site(pairs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"site": "test", "workshops": [{"name": "w1", "pairs": pairs}]}

    @staticmethod
    def load_yaml(text: str) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(text)
        return data

    # -- agents -----------------------------------------------------------------------
    def start(self, node: str, *extra: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"agent-{node}.log").open("ab")
        state = str(self.tmp / f"state-{node}")
        # A later --etcd in ``extra`` wins: a test may route one agent another way.
        argv = [*AGENT, "--node", node, "--etcd", self.agent_etcd, "--state-dir", state]
        if self.etcd.pki is not None:
            argv += self.etcd.client_args(node)[2:]  # its own certificate; --etcd above
        if self.allow_root_services:
            argv.append("--allow-root-services")
        argv += extra
        proc = self.spawn(
            node,
            argv,
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        log.close()
        self.agents[node] = proc
        return proc

    @property
    def agent_etcd(self) -> str:
        """etcd's URL as the agents reach it."""
        return self.etcd.url

    def spawn(self, node: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Run ``node``'s agent; a lab runs it inside the node's own network."""
        return subprocess.Popen(argv, **kw)

    def signal(self, node: str, sig: int) -> None:
        os.kill(self.agents[node].pid, sig)

    def crash(self, node: str) -> list[int]:
        """A server crash: the agent and everything it started die at the same instant."""
        agent = self.agents[node].pid
        pids = [agent, *descendants(agent)]
        for pid in pids:  # freeze first, so nobody reacts to the others dying
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen = repr(time.monotonic())  # no service of the node acts after this
        for pid in pids:
            (self.record / f"{pid}.kill").write_text(frozen)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.agents[node].wait(5)
        # A killed process runs until the kernel schedules its exit, which a loaded
        # machine may delay: the crash is over when none of them runs any more.
        wait_for(lambda: not any(map(pid_alive, pids)), 5, f"{node}'s processes killed")
        return pids

    async def crashed(self, node: str) -> list[int]:
        """``crash``, off this event loop: a relay this loop serves goes on carrying the
        other agents' etcd traffic while the kernel reaps the killed processes, as a
        network would (a loaded machine may take a few hundred ms over it)."""
        return await asyncio.to_thread(self.crash, node)

    def kill_service(self, pid: int) -> None:
        """SIGKILL a service and note when: a killed run's record has no end of its own."""
        os.kill(pid, signal.SIGKILL)
        (self.record / f"{pid}.kill").write_text(repr(time.monotonic() + 0.001))

    def log(self, node: str) -> str:
        return (self.tmp / f"agent-{node}.log").read_text(errors="replace")

    async def stop_all(self) -> None:
        for proc in self.agents.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        await asyncio.gather(
            *(asyncio.to_thread(stop_pid, p, signal.SIGTERM, 10.0) for p in self.agents.values())
        )
        for node in self.agents:  # a crashed agent's cgroup tree stays behind it
            cgroups.clear_stale(node)
        await self.store.close()

    # -- etcd views -------------------------------------------------------------------
    async def _get(self, key: str) -> Kv | None:
        return await _observed(lambda: self.store.get(key))

    async def leader(self, pair: str) -> tuple[str, int] | None:
        kv = await self._get(keys.leader(pair))
        if kv is None:
            return None
        return decode(Leader, kv.value, kv.key).node, kv.create_revision

    async def status(self, node: str) -> NodeStatus | None:
        kv = await self._get(keys.node_status(node))
        return None if kv is None else decode(NodeStatus, kv.value, kv.key)

    async def endpoint(self, service: str) -> EndpointRecord | None:
        kv = await self._get(keys.endpoint(service))
        return None if kv is None else decode(EndpointRecord, kv.value, kv.key)

    async def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        kvs, _ = await _observed(lambda: self.store.get_prefix(keys.EVENTS_PREFIX))
        kvs.sort(key=lambda kv: keys.event_order(kv.key))  # as they happened
        out = [json.loads(kv.value) for kv in kvs]
        return [e for e in out if kind is None or e["kind"] == kind]

    async def active(
        self, pair: str, not_epoch: int = 0, node: str | None = None, timeout: float = 10.0
    ) -> tuple[str, int]:
        """Wait until a node is active (services running, endpoint published)."""

        async def ready() -> tuple[str, int] | None:
            lead = await self.leader(pair)
            if lead is None or lead[1] <= not_epoch or (node and lead[0] != node):
                return None
            st = await self.status(lead[0])
            return lead if st is not None and st.role == "active" else None

        return await until(ready, timeout, f"an active node in {pair} after epoch {not_epoch}")

    async def standby(self, node: str, timeout: float = 10.0) -> None:
        """Wait until ``node`` reports itself a healthy standby (ready to take over)."""

        async def ready() -> bool:
            st = await self.status(node)
            return st is not None and st.role == "standby" and st.healthy

        await until(ready, timeout, f"{node} a healthy standby")

    # -- the services' own record -----------------------------------------------------
    def supervised(self) -> dict[tuple[str, int | str], dict[str, Any]]:
        """What the agents and their watchdogs logged of each run, on this process's
        monotonic clock: ``forked`` (before its fork) and ``ended``. Per (node, pid): the
        leader reaped (agent) or seen exited (watchdog). Per (node, cgroup): the cgroup
        seen empty (agent or watchdog), which bounds every process of the run."""
        offset = boottime() - time.monotonic()  # the agents log on CLOCK_BOOTTIME
        out: dict[tuple[str, int | str], dict[str, Any]] = {}
        for log in self.tmp.glob("agent-*.log"):
            node = log.stem.removeprefix("agent-")
            for line in log.read_text(errors="replace").splitlines():
                kind = next((k for k in RUN_EVENTS if k in line), None)
                fields = dict(FIELD.findall(line)) if kind else {}
                if kind is None or "at" not in fields:
                    continue
                key, at = RUN_EVENTS[kind], float(fields["at"]) - offset
                records = []
                run = f"{node}/{fields['pid']}" if "pid" in fields else None
                if "pid" in fields:
                    records.append(out.setdefault((node, int(fields["pid"])), {"run": run}))
                if "cgroup" in fields:
                    group = _cgroup(fields["cgroup"])
                    records.append(out.setdefault((node, group), {}))
                    if run is not None:
                        records[-1]["run"] = run
                        records[0]["cgroup"] = group
                for record in records:
                    record[key] = min(record.get(key, at), at)
        return out

    def intervals(self) -> list[dict[str, Any]]:
        """Every run of the test services: node, epoch, ``start`` (the service's own),
        ``begin`` (its fork, where the agent logged it) and ``end``.

        The end is the earliest record known to follow the run's last instant: the
        service's own on SIGTERM, its agent's (leader reaped, cgroup empty), its
        watchdog's (leader seen exited, cgroup seen empty) or the test's kill or freeze
        of it. A grandchild that left its service's process group is bounded by its
        service's cgroup only. Only a run with none of these is estimated, from its
        last heartbeat."""
        supervised = self.supervised()
        runs = []
        for path in sorted(self.record.glob("*.log")):
            lines = [json.loads(line) for line in path.read_text().splitlines() if line]
            head = lines[0]
            node = head["node"]
            if head.get("escaped"):
                group = _cgroup(head["cgroup"]) if head.get("cgroup") else None
                records = [supervised.get((node, group), {})] if group else []
            else:
                mine = supervised.get((node, head["pid"]), {})
                records = [mine, supervised.get((node, mine.get("cgroup", "")), {})]
            kill = path.with_suffix(".kill")
            ends = [x["end"] for x in lines if "end" in x]
            ends += [r["ended"] for r in records if "ended" in r]
            ends += [float(kill.read_text())] if kill.exists() else []
            beats = [x["hb"] for x in lines if "hb" in x]
            estimated = not ends
            end = min(ends) if ends else max(beats, default=head["start"]) + 0.05
            begin = min([r["forked"] for r in records if "forked" in r] + [head["start"]])
            # A grandchild that left its group is part of its service's run.
            own = f"{node}/{head.get('of', head['pid'])}"
            of = next((r["run"] for r in records if "run" in r), own)
            runs.append({**head, "begin": begin, "end": end, "estimated": estimated, "run": of})
        return runs

    def assert_no_overlap(self) -> int:
        """No two runs of one pair's service ever overlapped, from their fork to their end
        (runs on one node too: its supervisor ends a run before it forks the next)."""
        runs = self.intervals()
        for i, a in enumerate(runs):
            for b in runs[i + 1 :]:
                if a["service"] != b["service"] or a["run"] == b["run"]:
                    continue
                if a["begin"] < b["end"] and b["begin"] < a["end"]:
                    raise AssertionError(f"two runs of {a['service']} overlapped: {a} and {b}")
        return len(runs)


MADE: list[Cluster] = []  # since the current test started (tests/integration/conftest.py)


@contextlib.asynccontextmanager
async def checked_cluster(etcd: Etcd, tmp: Path) -> AsyncIterator[Cluster]:
    """Agents as real processes against ``etcd``; at the end, once every agent stopped
    (so the last runs are complete too), the services' own records prove that no two
    nodes ran a service at once."""
    c = Cluster(etcd, tmp)
    try:
        yield c
    finally:
        await c.stop_all()
    c.assert_no_overlap()
