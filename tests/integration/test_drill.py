"""``hapair drill``: real agents, a real registry, real faults, measured as a client sees
them. The partition drill runs inside a node's network namespace (``vip_lab``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from hapair.registry.console import drill
from hapair.registry.console.drill_faults import NFT_TABLE, nft_missing
from hapair.shared import keys
from hapair.shared.pki import Kind
from hapair.shared.records import SyncState, decode
from tests.support.client_lab import BIN, REGISTRY, RegistryProcess
from tests.support.cluster import Cluster, recording_service, until
from tests.support.harness import ROOT, free_port
from tests.support.netns import unavailable
from tests.support.pg_harness import (
    common_free_port,
    database_section,
    needs_postgres,
    write_secrets,
)
from tests.support.vip_lab import LabSite, service

NO_LAB = unavailable() or nft_missing()


# ---- pure parts ----------------------------------------------------------------------


# ---- end to end ----------------------------------------------------------------------


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _pair(c: Cluster, net: int, critical: bool = True) -> None:
    svc = recording_service("p-svc", free_port(), c.record, critical=critical)
    if not critical:
        svc["restart"] = {"max_restarts": 3, "window_s": 60, "backoff_s": 0.0}
    nodes = [{"name": n, "address": f"127.0.{net}.{i + 1}"} for i, n in enumerate("ab")]
    await c.apply(c.site([{"name": "p", "nodes": nodes, "services": [svc]}]))
    c.start("a")
    await c.active("p", node="a", timeout=20)
    c.start("b")
    await c.standby("b", timeout=20)


async def _drill(c: Cluster, registry: str, fault: str, **kw: Any) -> drill.Result:
    plan = await drill.make_plan(c.store, "p", fault, etcd=c.etcd.url, **kw)
    result = await drill.execute(plan, c.store, [registry], timeout_s=30)
    print("\n".join(drill.report(result)))
    return result


@pytest.fixture
async def registry(etcd: Any) -> Any:
    proc = await RegistryProcess(etcd).start()
    try:
        yield proc.url
    finally:
        await proc.stop()


@pytest.mark.e2e
async def test_drill_crash_measures_the_takeover(cluster: Cluster, registry: str) -> None:
    await _pair(cluster, 60)
    result = await _drill(cluster, registry, "crash")
    assert result.ok and result.takeover_s is not None
    assert result.figures is not None and result.figures.takeover is not None
    assert result.figures.takeover.node == "b"
    assert 1.0 < result.takeover_s < 6.0
    assert 0 < result.figures.outage_s <= result.takeover_s + 0.1
    assert result.new_leader is not None and result.new_leader[0] == "b"
    assert cluster.agents["a"].wait(5) == -signal.SIGKILL


@pytest.mark.e2e
async def test_drill_freeze_resumes_the_agent(cluster: Cluster, registry: str) -> None:
    await _pair(cluster, 61)
    result = await _drill(cluster, registry, "freeze", duration_s=4.0)
    assert result.ok and result.figures is not None and result.figures.takeover is not None
    assert result.figures.takeover.node == "b"
    assert _state(cluster.agents["a"].pid) != "T", "the agent was left frozen"
    assert result.after == ["a: back as standby"]


@pytest.mark.e2e
async def test_drill_service_restarted_in_place(cluster: Cluster, registry: str) -> None:
    await _pair(cluster, 62, critical=False)
    result = await _drill(cluster, registry, "service")
    assert result.ok and result.figures is not None
    assert result.figures.takeover is None, "a restart in place is not a takeover"
    assert result.figures.recovered is not None and result.figures.recovered.node == "a"
    assert 0 < result.figures.outage_s < 5
    assert any("recovered in place on a" in line for line in drill.report(result))


@pytest.mark.e2e
async def test_drill_switchover_from_the_command_line(cluster: Cluster, registry: str) -> None:
    await _pair(cluster, 63)
    out = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "hapair"), "drill", "p", "--fault", "switchover", "--yes"],
        env={**os.environ, **cluster.etcd.client_env(), "HAPAIR_REGISTRY": registry},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    print(out.stdout, out.stderr, file=sys.stderr)
    assert out.returncode == 0, out.stderr
    assert "takeover: b serving at epoch" in out.stdout
    assert "outage: " in out.stdout and "data loss: not measured" in out.stdout
    await cluster.active("p", node="b")
    # Without --yes and without a terminal, nothing is done.
    again = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "hapair"), "drill", "p", "--fault", "switchover"],
        env={**os.environ, **cluster.etcd.client_env(), "HAPAIR_REGISTRY": registry},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert again.returncode == 2 and "add --yes" in again.stderr
    assert (await cluster.leader("p") or ("", 0))[0] == "b"


@pytest.mark.e2e
async def test_drill_refuses_a_local_fault_when_the_active_is_elsewhere(
    cluster: Cluster, registry: str
) -> None:
    await _pair(cluster, 64)
    st = await cluster.status("a")
    assert st is not None
    # The same agent as seen from another machine: another boot id in its status.
    await cluster.store.put(
        "/hapair/v1/nodes/a/status", st.model_copy(update={"boot_id": "elsewhere"}).encode()
    )
    with pytest.raises(drill.DrillError, match="another machine"):
        await drill.make_plan(cluster.store, "p", "crash")


@pytest.mark.e2e
@pytest.mark.skipif(NO_LAB is not None, reason=f"no lab: {NO_LAB}")
async def test_drill_partition_inside_a_namespace(tmp_path: Path) -> None:
    async with LabSite(tmp_path, ["a", "b"]) as site:
        c = site.cluster
        port = free_port()
        nodes = [site.node_entry("a"), site.node_entry("b")]
        svc = service("p-svc", port, c.record, critical=True)
        await c.apply(c.site([{"name": "p", "nodes": nodes, "services": [svc]}]))
        c.start("a")
        await c.active("p", node="a", timeout=20)
        c.start("b")
        await c.standby("b", timeout=20)
        etcd = site.etcd_host
        registry_url = f"http://{etcd.address}:8700"
        site.lab.spawn(
            etcd, str(BIN / "hapair-registry"), *c.etcd_args(REGISTRY, Kind.REGISTRY),
            "--listen", f"{etcd.address}:8700", "--log-level", "warning",
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        async def registry_up() -> bool:
            out = await asyncio.to_thread(
                site["a"].run, str(BIN / "hapair"), "status", "--registry", registry_url,
                check=False,
            )  # fmt: skip
            return out.returncode == 0

        await until(registry_up, 20, "the registry in the lab")
        argv = [str(BIN / "hapair"), "drill", "p", "--fault", "partition", "--yes"]
        argv += ["--duration", "5", *c.etcd_args(), "--registry", registry_url]
        out = await asyncio.to_thread(site["a"].run, *argv, timeout=90, check=False)
        print(out.stdout, out.stderr, file=sys.stderr)
        assert out.returncode == 0, out.stderr
        assert "takeover: b serving at epoch" in out.stdout
        assert "a: back as standby" in out.stdout
        tables = site["a"].run("nft", "list", "tables").stdout
        assert NFT_TABLE not in tables, "the partition was not healed"
        await c.active("p", node="b")
    c.assert_no_overlap()


@pytest.mark.e2e
@needs_postgres
async def test_drill_crash_of_a_database_pair_loses_no_commit(
    etcd: Any, store: object, registry: str
) -> None:
    root = Path(tempfile.mkdtemp(prefix="hapair-drilldb-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as its own user below this directory
    write_secrets(root)
    addresses = ("127.0.0.1", "127.0.0.2")  # PostgreSQL sees loopback clients as .1
    port = common_free_port(addresses)
    c = Cluster(etcd, root)
    nodes = [{"name": n, "address": a} for n, a in zip("ab", addresses, strict=True)]
    database = database_section(root, port, synchronous=True)
    await c.apply(c.site([{"name": "p", "nodes": nodes, "database": database}]))
    try:
        c.start("a")
        await c.active("p", node="a", timeout=90)
        c.start("b")

        async def synced() -> bool:
            kv = await c.store.get(keys.sync_standby("p"))
            st = decode(SyncState, kv.value, kv.key) if kv else None
            return st is not None and st.primary == "a" and st.sync == ["b"]

        await until(synced, 90, "b the synchronous standby")
        result = await _drill(c, registry, "crash")
        assert result.ok, drill.report(result)
        assert result.acked is not None and result.acked > 0 and result.lost == []
        assert result.figures is not None and result.figures.takeover is not None
        assert result.figures.takeover.node == "b"
    finally:
        await c.stop_all()
        shutil.rmtree(root, ignore_errors=True)
