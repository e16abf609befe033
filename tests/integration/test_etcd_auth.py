"""etcd with client certificates and auth on, its roles from ``hapair etcd-auth apply``:
only an admin applies the topology, an agent writes nothing of another node or pair,
and real agents with their own certificates run their pair end to end."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from hapair.comm_server.role import CommReport, PairRole
from hapair.registry.app import create_app
from hapair.registry.appkeys import STORE, RegistryConfig
from hapair.shared import keys, pki
from hapair.shared.log import EventLog
from hapair.shared.records import Event, Leader, Paused, decode
from hapair.shared.store import Kv, PermissionDenied, Store
from hapair.shared.txn import Compare, Op
from hapair.workshop_agent import lease_revoke
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port
from tests.support.package_lab import build_server, package, served
from tests.support.tls_etcd import TlsEtcd, running_tls_etcd

HAPAIR = str(Path(sys.executable).parent / "hapair")
DEADLINE_S = 30.0
NET = 173  # 127.0.173.x: the agents' addresses
PEOPLE = ("--operator", "alice", "--registry", "reg-1")


@dataclass
class Secured:
    etcd: TlsEtcd
    pki: Path
    site_file: Path
    record: Path


def hapair(
    etcd: TlsEtcd,
    who: str | None,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = DEADLINE_S,
) -> subprocess.CompletedProcess[str]:
    """The ``hapair`` command showing ``who``'s certificate (only the CA when None), with
    none of this process's HAPAIR_* variables (``env``'s instead)."""
    given = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")}
    env.update(given)
    env.update(HAPAIR_ETCD=etcd.url, HAPAIR_ETCD_CA=str(etcd.pki_dir / pki.CA_CERT))
    if who is not None:
        files = pki.TlsFiles.issued(etcd.pki_dir, who)
        env.update(HAPAIR_ETCD_CERT=str(files.cert), HAPAIR_ETCD_KEY=str(files.key))
    run = subprocess.run([HAPAIR, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert "Traceback" not in run.stderr, run.stderr
    return run


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A TLS etcd holding the site (pairs p: a, b and q: c, d with a comm server), auth
    on with the roles ``hapair etcd-auth apply`` made; ``alice`` is an operator,
    ``reg-1`` a registry, ``root`` the admin, ``comm@c`` the comm server of q on c."""
    root = tmp_path_factory.mktemp("auth")
    d = root / "pki"
    pki.init(d, "Plant A")
    pki.issue(d, "etcd", "etcd-1", ["127.0.0.1"])
    pki.issue(d, "admin", "root")
    pki.issue(d, "operator", "alice")
    for node in "abcd":
        pki.issue(d, "agent", node)
    pki.issue(d, "comm", "comm@c", ["127.0.0.1"])
    pki.issue(d, "registry", "reg-1", ["127.0.0.1"])
    record = root / "record"
    record.mkdir()
    site = Cluster.site(
        [
            pair("p", ["a", "b"], NET, free_port(), record, lease_ttl_s=2.0),
            # Nobody runs q's agents: its comm server's role is run here.
            pair("q", ["c", "d"], NET + 1, 0, record, [{"name": "comm", "command": ["true"]}]),
        ]
    )
    site_file = root / "site.yaml"
    site_file.write_text(yaml.safe_dump(site))
    with running_tls_etcd(d, admin="root") as etcd:
        applied = hapair(etcd, "root", "topology", "apply", str(site_file))
        assert applied.returncode == 0, applied
        auth = hapair(etcd, "root", "etcd-auth", "apply", *PEOPLE)
        assert auth.returncode == 0, auth
        assert "user a added" in auth.stdout and "etcd auth on" in auth.stdout
        yield Secured(etcd, d, site_file, record)


async def test_only_an_admin_applies_the_topology(secured: Secured) -> None:
    etcd, site = secured.etcd, str(secured.site_file)
    before = etcd.etcdctl("get", keys.TOPOLOGY, "-w", "json", identity="root")
    for who in ("a", "alice"):
        refused = hapair(etcd, who, "topology", "apply", site)
        assert refused.returncode == 1, refused
        assert "permission denied" in refused.stderr, refused.stderr
    # No certificate: the connection itself is refused.
    anonymous = hapair(etcd, None, "topology", "apply", site)
    assert anonymous.returncode == 3 and "permission denied" not in anonymous.stderr, anonymous
    # etcd's revision of the topology key did not move.
    after = etcd.etcdctl("get", keys.TOPOLOGY, "-w", "json", identity="root")
    assert '"mod_revision"' in after.stdout
    mod = after.stdout.split('"mod_revision":')[1].split(",")[0]
    assert mod == before.stdout.split('"mod_revision":')[1].split(",")[0]

    assert hapair(etcd, "root", "topology", "apply", site).returncode == 0
    # A second etcd-auth apply converges: nothing left to change.
    again = hapair(etcd, "root", "etcd-auth", "apply", *PEOPLE)
    assert again.returncode == 0 and "already as planned" in again.stdout, again


@pytest.fixture
async def agent_a(secured: Secured) -> AsyncIterator[Store]:
    store = Store(secured.etcd.url, timeout=5.0, tls=pki.TlsFiles.issued(secured.pki, "a"))
    try:
        yield store
    finally:
        await store.close()


async def test_an_agent_cannot_write_another_nodes_status_or_another_pairs_leader(
    agent_a: Store,
) -> None:
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(PermissionDenied, match="permission denied"):
            await agent_a.put(keys.node_status("b"), b"{}")
        with pytest.raises(PermissionDenied, match="permission denied"):
            await agent_a.txn(
                [Compare.absent(keys.leader("q"))],
                [Op.put(keys.leader("q"), Leader(node="a").encode())],
            )
        with pytest.raises(PermissionDenied, match="permission denied"):
            await agent_a.put(keys.paused("p"), b"{}")  # an operator's
        # Events: its own only, never filed as another node's or an operator's.
        for writer in ("b", "alice"):
            with pytest.raises(PermissionDenied, match="permission denied"):
                await agent_a.put(keys.event(1, writer), b"{}")
        await agent_a.put(keys.event(1, "a"), b"{}")
        await agent_a.delete(keys.event(1, "a"))
        # Its own pair's leader key, guarded as an election is: allowed (then undone).
        lease = await agent_a.grant(2)
        result = await agent_a.txn(
            [Compare.absent(keys.leader("p"))],
            [Op.put(keys.leader("p"), Leader(node="a").encode(), lease=lease)],
        )
        assert result.succeeded
        await agent_a.revoke(lease)
        assert await agent_a.get(keys.leader("p")) is None


async def test_agents_with_their_own_certificates_run_their_pair(
    secured: Secured, tmp_path: Path
) -> None:
    """Real agents against the auth-enabled etcd: a becomes active and publishes its
    endpoint, b standby; an operator's switchover moves the pair to b."""
    cluster = Cluster(secured.etcd, tmp_path)
    cluster.record = secured.record
    try:
        cluster.start("a")
        _, epoch = await cluster.active("p", node="a", timeout=DEADLINE_S)
        endpoint = await until(lambda: cluster.endpoint("p-svc"), DEADLINE_S, "p-svc published")
        assert (endpoint.node, endpoint.epoch) == ("a", epoch)
        cluster.start("b")
        await cluster.standby("b", timeout=DEADLINE_S)

        moved = await asyncio.to_thread(
            hapair, secured.etcd, "alice", "switchover", "p", "--to", "b", "--wait", "20"
        )
        assert moved.returncode == 0, moved
        await cluster.active("p", not_epoch=epoch, node="b", timeout=DEADLINE_S)
    finally:
        await cluster.stop_all()
    cluster.assert_no_overlap()
    # Nothing an agent did, up to revoking its lease at the end, was refused.
    assert "permission denied" not in cluster.log("a") + cluster.log("b")


async def test_a_dead_agent_s_watchdog_revokes_its_lease_as_the_agent(
    secured: Secured, tmp_path: Path
) -> None:
    """The watchdog of a killed agent revokes its lease as the agent's etcd user, which
    may revoke its own lease (its leader key, status and endpoints) and no lease that
    holds another node's key. etcd's JSON gateway, which would have spared the watchdog
    its own gRPC call, does not take the agent's certificate as the agent."""
    cluster = Cluster(secured.etcd, tmp_path)
    cluster.record = secured.record
    try:
        cluster.start("a")
        _, epoch = await cluster.active("p", node="a", timeout=DEADLINE_S)
        cluster.start("b")
        await cluster.standby("b", timeout=DEADLINE_S)
        cluster.signal("a", signal.SIGKILL)
        cluster.agents["a"].wait(5)
        await cluster.active("p", not_epoch=epoch, node="b", timeout=DEADLINE_S)
        await until(
            lambda: asyncio.sleep(0, "its lease revoked, its term ended" in cluster.log("a")),
            5,
            "a's watchdog revoked a's lease",
        )
    finally:
        await cluster.stop_all()
    cluster.assert_no_overlap()
    assert "permission denied" not in cluster.log("a") + cluster.log("b")

    files = pki.TlsFiles.issued(secured.pki, "a")
    as_a = lease_revoke.Target.parse(
        secured.etcd.url, str(files.ca), str(files.cert), str(files.key)
    )
    admin = Store(secured.etcd.url, timeout=5.0, tls=pki.TlsFiles.issued(secured.pki, "root"))
    try:
        lease = await admin.grant(30)
        await admin.put(keys.node_status("b"), b"{}", lease=lease)  # b's key on it
        with pytest.raises(lease_revoke.RevokeError, match="lease that lives on"):
            await asyncio.to_thread(lease_revoke.revoke, as_a, lease)
        host, port = secured.etcd.url.removeprefix("https://").split(":")
        context = files.client_context()
        gateway = http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
        body = json.dumps({"ID": str(lease)})
        await asyncio.to_thread(gateway.request, "POST", "/v3/lease/revoke", body)
        answer = await asyncio.to_thread(gateway.getresponse)
        said = answer.read().decode()
        gateway.close()
        assert answer.status == 400 and "CommonName" in said, said
        assert await admin.get(keys.node_status("b")) is not None, "the lease was revoked"
        await admin.revoke(lease)
    finally:
        await admin.close()


async def test_a_comm_server_with_its_own_certificate_follows_its_pair(secured: Secured) -> None:
    """The comm server's role (user ``comm@c``) reads the topology, its pair's leader
    and its peers' reports, and files its own report on its own lease; it may not
    file another node's."""
    files = pki.TlsFiles.issued(secured.pki, "comm@c")
    comm = Store(secured.etcd.url, timeout=5.0, tls=files)
    admin = Store(secured.etcd.url, timeout=5.0, tls=pki.TlsFiles.issued(secured.pki, "root"))
    log = EventLog("hapair.comm", node="c", pair="q")
    role = PairRole(comm, "q", "c", "comm", lambda: ({}, {}), lambda: None, log, refresh_s=0.5)
    task = asyncio.create_task(role.run())
    try:
        async with asyncio.timeout(DEADLINE_S):
            lease = await admin.grant(30)
            elected = await admin.txn(
                [Compare.absent(keys.leader("q"))],
                [Op.put(keys.leader("q"), Leader(node="c").encode(), lease=lease)],
            )
            assert elected.succeeded

            async def serving() -> CommReport | None:
                kv = await admin.get(keys.report("c", "comm"))
                report = decode(CommReport, kv.value, kv.key) if kv is not None else None
                return report if report is not None and report.serving else None

            report = await until(serving, DEADLINE_S, "comm@c serving and reporting")
            assert report.epoch == elected.revision
            with pytest.raises(PermissionDenied):
                await comm.put(keys.report("d", "comm"), b"{}")
            await admin.revoke(lease)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await role.close()
        await comm.close()
        await admin.close()


async def test_a_registry_with_its_own_certificate_serves_and_relays_admin_requests(
    secured: Secured,
) -> None:
    """The registry (user ``reg-1``) mirrors the site, writes its heartbeats and, for
    its admin routes, the operator's keys; never the topology."""
    files = pki.TlsFiles.issued(secured.pki, "reg-1")
    config = RegistryConfig(heartbeat_s=0.2, open_admin=True)  # what etcd allows is tested here
    app = create_app(secured.etcd.url, config, tls=files)
    admin = Store(secured.etcd.url, timeout=5.0, tls=pki.TlsFiles.issued(secured.pki, "root"))
    try:
        async with asyncio.timeout(DEADLINE_S), TestClient(TestServer(app)) as client:

            async def answers(method: str, path: str, status: int) -> bool:
                async with client.request(method, path, json={}) as resp:
                    return resp.status == status

            await until(lambda: answers("GET", "/healthz", 200), DEADLINE_S, "registry synced")

            async def heartbeats() -> list[Kv]:
                return (await admin.get_prefix(keys.REGISTRIES_PREFIX))[0]

            beats = await until(heartbeats, DEADLINE_S, "the registry's heartbeat in etcd")
            assert all(kv.key.startswith(keys.registries_of("reg-1")) for kv in beats), beats
            with pytest.raises(PermissionDenied):  # another registry's
                await app[STORE].put(keys.registry_heartbeat("reg-2", "x"), b"{}")
            assert await answers("POST", "/v1/pairs/q/pause", 200)
            assert await admin.get(keys.paused("q")) is not None
            assert await answers("POST", "/v1/pairs/q/resume", 200)
            assert await admin.get(keys.paused("q")) is None
            with pytest.raises(PermissionDenied):
                await app[STORE].put(keys.TOPOLOGY, b"{}")
    finally:
        await admin.close()


async def test_an_operator_is_named_by_its_certificate_and_files_its_own_events(
    secured: Secured,
) -> None:
    """``hapair pause`` with alice's certificate: the flag and the event say alice (a
    name the shell declares follows in brackets, never replaces it), and the event is
    filed under alice's own events."""
    declared = {"HAPAIR_OPERATOR": "night shift"}
    paused = hapair(secured.etcd, "alice", "pause", "q", "--reason", "filter", env=declared)
    assert paused.returncode == 0, paused
    admin = Store(secured.etcd.url, timeout=5.0, tls=pki.TlsFiles.issued(secured.pki, "root"))
    try:
        flag = await admin.get(keys.paused("q"))
        assert flag is not None
        assert decode(Paused, flag.value, flag.key).by == "alice (night shift)"
        mine, _ = await admin.get_prefix(keys.events_of("alice"))
        kinds = [decode(Event, kv.value, kv.key).kind for kv in mine]
        assert "paused" in kinds, kinds
    finally:
        assert hapair(secured.etcd, "alice", "resume", "q").returncode == 0
        await admin.close()


async def test_an_operator_rolls_a_pair_out_with_the_rights_etcd_auth_gave_it(
    secured: Secured, tmp_path: Path
) -> None:
    """``hapair rollout`` with alice's certificate: the rollout's key, its restart
    requests (answered by the agents, with theirs) and its events are within an
    operator's rights; the pair ends on the new version, b active."""
    site = yaml.safe_load(secured.site_file.read_text())
    files = tmp_path / "files"
    files.mkdir()

    def with_warm(version: str) -> tuple[Path, str]:
        """The site with warm on ``version``, and that version's directory name."""
        archive = build_server(files, "warm", version)
        pkg = package(archive, archive.as_uri(), version)
        warm = served("warm", free_port(), pkg, tmp_path / "record-warm", placement="all")
        changed = copy.deepcopy(site)
        changed["workshops"][0]["pairs"][0]["services"].append(warm)
        path = tmp_path / f"site-{version}.yaml"
        path.write_text(yaml.safe_dump(changed))
        return path, f"{version}-{pkg['sha256'][:12]}"

    cluster = Cluster(secured.etcd, tmp_path)
    cluster.record = secured.record

    async def warm_on(node: str, version: str) -> bool:
        status = await cluster.status(node)
        found = [s for s in (status.services if status else []) if s.name == "warm"]
        return bool(found) and found[0].state == "running" and found[0].package == version

    applied = hapair(secured.etcd, "root", "topology", "apply", str(with_warm("1.0")[0]))
    assert applied.returncode == 0, applied
    try:
        cluster.start("a")
        _, epoch = await cluster.active("p", node="a", timeout=DEADLINE_S)
        cluster.start("b")
        await cluster.standby("b", timeout=DEADLINE_S)
        v2, version = with_warm("2.0")
        applied = hapair(secured.etcd, "root", "topology", "apply", str(v2))
        assert applied.returncode == 0, applied
        done = await asyncio.to_thread(
            hapair, secured.etcd, "alice", "rollout", "p", "--yes", timeout=120
        )
        assert done.returncode == 0, done
        await cluster.active("p", not_epoch=epoch, node="b", timeout=DEADLINE_S)
        for node in ("a", "b"):
            await until(lambda n=node: warm_on(n, version), DEADLINE_S, f"warm 2.0 on {node}")
    finally:
        await cluster.stop_all()
        restored = hapair(secured.etcd, "root", "topology", "apply", str(secured.site_file))
        assert restored.returncode == 0, restored
    cluster.assert_no_overlap()
    assert "permission denied" not in cluster.log("a") + cluster.log("b")
