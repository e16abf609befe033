"""The ``hapair`` command as a real process against a real etcd (and a registry)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hapair.registry.app import create_app
from hapair.shared import keys, pki, records
from hapair.shared.plcs import PathHealth, PlcHealth
from hapair.shared.store import Store
from tests.integration.test_failover import two_nodes
from tests.support.cluster import Cluster, holds
from tests.support.harness import Etcd, default_sigint, free_port
from tests.support.site_records import SITE_YAML, FakeAgent, apply_site

HAPAIR = str(Path(sys.executable).parent / "hapair")
DEADLINE_S = 10.0
LEASE_TTL_S = 2.0  # the default of a pair
OPERATOR = "tester"


@dataclass
class Run:
    code: int
    out: str
    err: str


def _env(etcd: Etcd | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")}
    env.update(COLUMNS="200", HAPAIR_OPERATOR=OPERATOR)
    if etcd is not None:  # over TLS, the operator's certificate names them
        env.pop("HAPAIR_OPERATOR")
        env.update(etcd.operator_env(OPERATOR))
    return env


def _etcd_args(etcd: Etcd) -> list[str]:
    """``--etcd URL`` and, over TLS, the operator's certificate, as options."""
    return etcd.client_args(OPERATOR, pki.Kind.OPERATOR)


async def hapair(*args: str, etcd: Etcd | None = None) -> Run:
    proc = await asyncio.create_subprocess_exec(
        HAPAIR,
        *args,
        env=_env(etcd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE_S * 2):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    result = Run(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.err, result.err
    return result


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML)
    return path


async def everything(store: Store) -> dict[str, bytes]:
    kvs, _ = await store.get_prefix(keys.PREFIX + "/")
    return {kv.key: kv.value for kv in kvs}


async def active_pair(store: Store) -> dict[str, FakeAgent]:
    await apply_site(store)
    agents = {n: await FakeAgent(store, n, "asm").up() for n in ("asm-a", "asm-b", "asm-c")}
    await agents["asm-a"].become_active()
    await agents["asm-a"].publish("mes-api", 8080)
    return agents


async def act_as_active(store: Store, agents: dict[str, FakeAgent], reject: str = "") -> None:
    """Answer one switchover request of pair asm as its active agent would."""
    _, revision = await store.get_prefix(keys.switchover("asm"))
    async for change in store.watch_prefix(keys.switchover("asm"), revision + 1):
        if change.deleted:
            continue
        request = records.decode(records.Switchover, change.kv.value, change.kv.key)
        active = next(a for a in agents.values() if a.epoch is not None)
        target = request.to or next(n for n, a in agents.items() if a is not active)
        kind = "switchover_rejected" if reject else "switchover"
        event = records.Event(
            kind=kind,
            pair="asm",
            node=active.node,
            reason=reject,
            details={"request": request.id, "to": target},
        )
        await store.put(keys.event(change.kv.mod_revision, active.node), event.encode())
        await store.delete(keys.switchover("asm"))
        if not reject:
            await active.resign()
            await agents[target].become_active()
        return


# ---- topology ---------------------------------------------------------------------


async def test_topology_validate(site_file: Path, tmp_path: Path) -> None:
    ok = await hapair("topology", "validate", str(site_file))
    assert ok.code == 0
    assert ok.out.strip() == (
        f"{site_file}: valid: site plant-1: 2 workshop(s), 2 pair(s), 5 node(s), 3 service(s)"
    )
    bad = tmp_path / "bad.yaml"
    failover = "name: pnt\n        failover: {lease_ttl_s: 0.5}\n"
    bad.write_text(
        SITE_YAML.replace("127.0.0.12", "not an address!").replace("name: pnt\n", failover)
    )
    run = await hapair("topology", "validate", str(bad))
    assert run.code == 2
    lines = run.err.splitlines()
    assert lines[0] == f"hapair: {bad}: invalid topology, nothing was changed"
    assert (
        "  workshops[0].pairs[0].nodes[1].address: 'not an address!' is neither an IP "
        "address nor a host name" in lines
    )
    assert any(line.startswith("  workshops[1].pairs[0].failover.lease_ttl_s:") for line in lines)
    # Valid, but costly: said, and still valid.
    short = tmp_path / "short.yaml"
    short.write_text(
        SITE_YAML.replace("name: pnt\n", "name: pnt\n        failover: {lease_ttl_s: 1}\n")
    )
    run = await hapair("topology", "validate", str(short))
    assert run.code == 0, run.err
    assert "  caution: pair pnt: lease_ttl_s 1 without a network: section" in run.out


async def test_invalid_topology_is_not_applied(store: Store, etcd: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: plant-1\nworkshops: [{name: a, pairs: [{name: p, nodes: []}]}]\n")
    run = await hapair("topology", "apply", str(bad), *_etcd_args(etcd))
    assert run.code == 2
    assert "workshops[0].pairs[0].nodes: List should have at least 2 items" in run.err
    assert await everything(store) == {}


async def test_topology_apply_then_show(store: Store, etcd: Any, site_file: Path) -> None:
    run = await hapair("topology", "apply", str(site_file), etcd=etcd)
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        f"applied {site_file} to etcd at {etcd.url.split('://')[1]}: site plant-1: "
        "2 workshop(s), 2 pair(s), 5 node(s), 3 service(s)",
        "  first topology of this site",
    ]
    show = await hapair("topology", "show", etcd=etcd)
    assert show.code == 0
    assert show.out.startswith("# applied by tester at ")
    assert "- name: asm-b\n      address: 127.0.0.12\n" in show.out
    kv = await store.get(keys.TOPOLOGY)
    assert kv is not None
    assert records.decode(records.TopologyDoc, kv.value, kv.key).applied_by == "tester"


# ---- status -----------------------------------------------------------------------


async def degraded_site(store: Store) -> int:
    agents = await active_pair(store)
    await agents["asm-b"].up(healthy=False)
    await agents["asm-c"].crash()
    await store.put(keys.drained("asm-c"), records.Drained(by="op").encode())
    await store.put(keys.paused("pnt"), records.Paused(by="op", reason="window").encode())
    epoch = agents["asm-a"].epoch
    assert epoch is not None
    return epoch


def assert_degraded_status(out: str, epoch: int) -> None:
    assert "site plant-1" in out
    assert "PAUSED: pnt: no automatic failover" in out
    assert f"epoch {epoch}" in out
    for text in (
        "workshop assembly",
        "workshop paint",
        "UNHEALTHY",
        "disk full",
        "DRAINED",
        "mes-api running (1 restart)",
        "mes-api http://127.0.0.11:8080",
        "scada: pair pnt has no active node and is paused",
    ):
        assert text in out, text
    assert "│ asm-c │ down" in out


async def test_status_from_etcd(store: Store, etcd: Any) -> None:
    epoch = await degraded_site(store)
    run = await hapair("status", *_etcd_args(etcd))
    assert run.code == 0, run.err
    assert_degraded_status(run.out, epoch)


@pytest.fixture
async def registry_url(etcd: Any) -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(etcd.url, tls=etcd.tls), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_status_from_a_registry(store: Store, registry_url: str) -> None:
    epoch = await degraded_site(store)
    await store.put(keys.event(1, "x"), records.Event(kind="elected", pair="asm").encode())
    async with asyncio.timeout(DEADLINE_S):
        while True:  # the registry answers once its watch has seen the writes
            run = await hapair("status", "--registry", registry_url)
            if "elected" in run.out:
                break
    assert run.code == 0, run.err
    assert_degraded_status(run.out, epoch)


async def test_status_shows_every_plc_as_each_node_sees_it(store: Store, etcd: Any) -> None:
    agents = await active_pair(store)
    primary, backup = "10.30.1.61:502", "10.31.1.61:502"
    await agents["asm-a"].report_plcs(
        {
            "press-1": PlcHealth(
                state="degraded",
                path=1,
                critical=True,
                problem=f"primary {primary} down (connection refused)",
                tags={"good": 3, "stale": 0, "bad": 1},
                paths=[
                    PathHealth(endpoint=primary, up=False, errors=4, last_error="refused"),
                    PathHealth(endpoint=backup, up=True, latency_ms=0.41),
                ],
            ),
            "oven-1": PlcHealth(
                state="down",
                problem="primary opc.tcp://10.30.1.63:4840: no reply within 1 s",
                paths=[PathHealth(endpoint="opc.tcp://10.30.1.63:4840", up=False)],
            ),
        }
    )
    await agents["asm-b"].report_plcs(
        {
            "press-1": PlcHealth(
                state="ok",
                critical=True,
                paths=[
                    PathHealth(endpoint=primary, up=True, latency_ms=0.5),
                    PathHealth(endpoint=backup, up=None),
                ],
            )
        }
    )
    garbage = keys.report("asm-c", "comm")
    await store.put(garbage, b'{"service": "comm", "plcs": {"press-1": {"state": 3}}}')
    run = await hapair("status", *_etcd_args(etcd))
    assert run.code == 0, run.err
    assert f"{garbage}: plcs.press-1.state: Input should be a valid string" in run.out
    rows = [
        line
        for line in run.out.splitlines()
        if line.startswith("│") and ("press-1" in line or "oven-1" in line)
    ]
    assert "PLCs of workshop assembly" in run.out
    assert [[cell.strip() for cell in row.split("│")[1:-1]] for row in rows] == [
        [
            "asm",
            "press-1 critical",
            "asm-a",
            "degraded",
            "backup",
            f"primary {primary} DOWN, backup {backup} up 0.41 ms",
            f"primary {primary} down (connection refused); 1 tag bad",
        ],
        [
            "",
            "press-1 critical",
            "asm-b",
            "ok",
            "primary",
            f"primary {primary} up 0.50 ms, backup {backup} not tried",
            "",
        ],
        [
            "",
            "oven-1",
            "asm-a",
            "down",
            "primary",
            "primary opc.tcp://10.30.1.63:4840 DOWN",
            "primary opc.tcp://10.30.1.63:4840: no reply within 1 s",
        ],
    ]
    assert "PLCs of workshop paint" not in run.out  # no PLC there


# Raises KeyboardInterrupt, as a Ctrl-C would, in the middle of the command's imports
# (rich.live loads after etcd's and the registry's clients), then runs the command.
_CTRL_C_WHILE_LOADING = f"""
import runpy, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "rich.live":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
sys.argv = ["hapair", "status", "--watch", "--etcd", "http://127.0.0.1:9"]
runpy.run_path({HAPAIR!r}, run_name="__main__")
"""


async def test_ctrl_c_while_the_command_loads_exits_130_quietly() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CTRL_C_WHILE_LOADING,
        env=_env(None),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE_S * 2):
        out, err = await proc.communicate()
    assert (proc.returncode, out, err) == (130, b"", b"")


class Watch:
    """``hapair status --watch`` as an operator runs it in a terminal, left with Ctrl-C."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen = ""

    @classmethod
    async def start(cls, etcd: Etcd) -> Watch:
        proc = await asyncio.create_subprocess_exec(
            HAPAIR,
            "status",
            "--watch",
            env=_env(etcd),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=default_sigint,
        )
        return cls(proc)

    async def read_until(self, text: str) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(DEADLINE_S):
            while text not in self.seen:
                self.seen += (await self.proc.stdout.readline()).decode()

    async def ctrl_c(self) -> str:
        """Its stderr once it has ended after a SIGINT; killed if it does not end."""
        self.proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(DEADLINE_S):
                _, err = await self.proc.communicate()
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        return err.decode()


async def test_status_watch_redraws_on_change_and_stops_on_ctrl_c(store: Store, etcd: Any) -> None:
    await active_pair(store)
    watch = await Watch.start(etcd)
    try:
        await watch.read_until("workshop paint")
        assert "PAUSED" not in watch.seen
        await store.put(keys.paused("asm"), records.Paused(by="op").encode())
        await watch.read_until("PAUSED: asm")
    finally:
        err = await watch.ctrl_c()
    assert watch.proc.returncode == 0, err
    assert "Traceback" not in err


async def test_status_watch_stops_on_ctrl_c_while_etcd_is_frozen(store: Store, etcd: Any) -> None:
    """A frozen etcd neither answers nor closes the connection: closing it must not hold
    up the operator's Ctrl-C."""
    await active_pair(store)
    watch = await Watch.start(etcd)
    try:
        await watch.read_until("workshop paint")
        etcd.proc.send_signal(signal.SIGSTOP)
    finally:
        try:
            err = await watch.ctrl_c()
        finally:
            etcd.proc.send_signal(signal.SIGCONT)
    assert watch.proc.returncode == 0, err
    assert "Traceback" not in err


# ---- switchover, pause, drain -----------------------------------------------------


async def test_switchover_waits_for_the_new_active(store: Store, etcd: Any) -> None:
    agents = await active_pair(store)
    old_epoch = agents["asm-a"].epoch
    responder = asyncio.create_task(act_as_active(store, agents))
    run = await hapair("switchover", "asm", "--to", "asm-c", etcd=etcd)
    await responder
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0].startswith("switchover of pair asm requested (request ")
    assert lines[0].endswith("): asm-a -> asm-c")
    assert "  asm-a is handing over to asm-c" in lines
    assert lines[-1].startswith(
        f"pair asm: asm-c is active now (epoch {agents['asm-c'].epoch}, "
        f"was asm-a epoch {old_epoch}) after "
    )


async def test_rejected_switchover_exits_1_with_the_reason(store: Store, etcd: Any) -> None:
    agents = await active_pair(store)
    responder = asyncio.create_task(act_as_active(store, agents, reject="asm-b lags behind"))
    run = await hapair("switchover", "asm", etcd=etcd)
    await responder
    assert run.code == 1
    assert run.err.strip() == (
        "hapair: switchover of pair asm rejected by asm-a: asm-b lags behind"
    )


async def test_unanswered_switchover_times_out(store: Store, etcd: Any) -> None:
    await active_pair(store)
    run = await hapair("switchover", "asm", "--wait", "0.3", etcd=etcd)
    assert run.code == 1
    assert run.err.strip() == (
        "hapair: no outcome for switchover of pair asm after 0.3 s: the request is still "
        "pending: is the active agent of pair asm running?"
    )


async def test_pause_blocks_switchover_until_resume(store: Store, etcd: Any) -> None:
    await active_pair(store)
    run = await hapair("pause", "asm", "--reason", "maintenance", etcd=etcd)
    assert (run.code, run.out.strip()) == (
        0,
        "pair asm paused: no automatic failover until "
        "`hapair resume asm`; its services keep running",
    )
    run = await hapair("switchover", "asm", "--to", "asm-b", etcd=etcd)
    assert (run.code, run.err.strip()) == (1, "hapair: pair asm is paused; resume it first")
    run = await hapair("resume", "asm", etcd=etcd)
    assert run.code == 0 and run.out.startswith("pair asm resumed: automatic failover is on")
    run = await hapair("resume", "asm", etcd=etcd)
    assert (run.code, run.err.strip()) == (1, "hapair: pair asm is not paused")
    assert await store.get(keys.switchover("asm")) is None


async def test_drain_the_active_moves_the_pair_then_undrain(store: Store, etcd: Any) -> None:
    agents = await active_pair(store)
    responder = asyncio.create_task(act_as_active(store, agents))
    run = await hapair("drain", "asm-a", "--reason", "disk swap", etcd=etcd)
    await responder
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == "node asm-a drained: it will not become active"
    assert lines[1].startswith("asm-a is active in pair asm: switchover requested (request ")
    assert lines[-1].startswith("pair asm: asm-b is active now")
    run = await hapair("undrain", "asm-a", etcd=etcd)
    assert run.code == 0 and run.out.startswith("node asm-a undrained: eligible again")
    assert await store.get(keys.drained("asm-a")) is None


async def test_unknown_node_and_pair_are_refused(store: Store, etcd: Any) -> None:
    await apply_site(store)
    run = await hapair("drain", "zz", etcd=etcd)
    assert (run.code, run.err.strip()) == (1, "hapair: no node named 'zz' in the topology")


# ---- reaching etcd ----------------------------------------------------------------


async def test_unreachable_etcd_exits_3_with_one_line() -> None:
    run = await hapair("status", "--etcd", f"http://127.0.0.1:{free_port()}")
    assert run.code == 3
    assert run.err.startswith("hapair: etcd at 127.0.0.1:") and run.err.count("\n") == 1
    run = await hapair("pause", "asm", "--etcd", f"http://127.0.0.1:{free_port()}")
    assert run.code == 3
    port = free_port()
    run = await hapair("status", "--registry", f"http://127.0.0.1:{port}")
    assert run.code == 3
    assert run.err.startswith(f"hapair: cannot reach the registry at http://127.0.0.1:{port}: ")


async def test_missing_or_bad_etcd_is_a_usage_error() -> None:
    run = await hapair("pause", "asm")
    assert (run.code, run.err.strip()) == (
        2,
        "hapair: no etcd given: use --etcd URL or set HAPAIR_ETCD",
    )
    run = await hapair("pause", "asm", "--etcd", "ftp://x")
    assert run.code == 2 and "bad etcd endpoint 'ftp://x'" in run.err
    run = await hapair("switchover", "asm", "--wait", "soon", "--etcd", "http://x:1")
    assert run.code == 2 and "not a number of seconds: 'soon'" in run.err


async def test_takeover_warns_then_forces_only_a_pair_without_an_active(
    store: Store, etcd: Any
) -> None:
    agents = await active_pair(store)
    refused = await hapair("takeover", "asm", "asm-b", "--yes", etcd=etcd)
    assert refused.code == 1
    assert "pair asm has an active node (asm-a" in refused.err
    await store.put(
        keys.sync_standby("asm"),
        records.SyncState(primary="asm-a", sync=[], degraded=True, epoch=1).encode(),
    )
    await agents["asm-a"].resign()
    before = await everything(store)
    no_terminal = await hapair("takeover", "asm", "asm-b", etcd=etcd)
    assert no_terminal.code == 2 and "add --yes" in no_terminal.err
    assert await everything(store) == before, "a takeover not confirmed changed something"
    run = await hapair("takeover", "asm", "asm-b", "--yes", "--wait", "0", etcd=etcd)
    assert run.code == 0, run.err
    assert run.out.startswith(
        "WARNING: asm-b is not recorded as holding every acknowledged commit of pair asm"
    )
    assert "takeover of pair asm by asm-b forced" in run.out
    kv = await store.get(keys.takeover("asm"))
    assert kv is not None and records.decode(records.Takeover, kv.value, kv.key).to == "asm-b"
    assert kv.lease, "the request must lapse by itself"
    down = await hapair("takeover", "asm", "asm-x", "--yes", etcd=etcd)
    assert down.code == 1 and "asm-x is not a node of pair asm" in down.err


# ---- against real agents ----------------------------------------------------------


async def test_switchover_through_the_command_line_with_real_agents(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 64)
    run = await hapair("switchover", "p", "--to", "b", etcd=cluster.etcd)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0].endswith("): a -> b")
    new = await cluster.leader("p")
    assert new is not None and new[0] == "b" and new[1] > epoch
    assert lines[-1].startswith(f"pair p: b is active now (epoch {new[1]}, was a epoch {epoch})")
    await cluster.active("p", node="b", not_epoch=epoch)
    # Back to a, now that it is the standby.
    await cluster.standby("a")
    run = await hapair("switchover", "p", etcd=cluster.etcd)
    assert run.code == 0, run.err
    assert (await cluster.leader("p") or ("",))[0] == "a"


async def test_drain_through_the_command_line_with_real_agents(cluster: Cluster) -> None:
    _, epoch = await two_nodes(cluster, 65)
    run = await hapair("drain", "a", "--reason", "disk swap", etcd=cluster.etcd)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == "node a drained: it will not become active"
    assert lines[-1].startswith("pair p: b is active now")
    _, epoch_b = await cluster.active("p", node="b", not_epoch=epoch)
    # Drained, a does not take the pair back when b stops.
    cluster.signal("b", signal.SIGTERM)
    cluster.agents["b"].wait(15)
    await holds(lambda: _leaderless(cluster), 2 * LEASE_TTL_S, "a drained node took over")
    run = await hapair("undrain", "a", etcd=cluster.etcd)
    assert run.code == 0 and run.out.startswith("node a undrained: eligible again")
    await cluster.active("p", node="a", not_epoch=epoch_b)


async def _leaderless(c: Cluster) -> bool:
    return await c.leader("p") is None
