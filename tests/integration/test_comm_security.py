"""The comm server's OPC UA server as a client on the plant network meets it: users,
roles and secure endpoints, against a real Modbus PLC simulator behind it.

Each attack is made the way a client on the network would: an anonymous write, the
user name ``admin`` with any password, a write to ServiceLevel or to the role nodes,
a node deleted; and what must still work: a writer's write over SignAndEncrypt."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import security_policies

from hapair.comm_server.access import ServerSecurity, hash_password, server_security
from hapair.shared import pki
from hapair.shared.opcua_security import ClientSecurity, application_uri, pem
from hapair.shared.topology import OpcUaSecurity
from tests.support.client_lab import BIN
from tests.support.harness import free_port
from tests.support.plc_sim import CommUnderTest, ModbusPlc, running_comm

S = ua.StatusCodes
V = ua.VariantType
SERVICE_LEVEL = "ns=0;i=2267"
REDUNDANCY_SUPPORT = "ns=0;i=3709"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}
POLICIES = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}


@dataclass
class Site:
    """A site PKI in a directory: the comm server's certificate, a SCADA client's
    (a writer by its certificate), an intruder's from another CA; the users file."""

    pki: Path
    other: Path
    users: Path

    def file(self, name: str, ext: str) -> Path:
        return self.pki / f"{name}.{ext}"

    def security(self, **opcua: Any) -> ServerSecurity:
        return server_security(
            OpcUaSecurity(**opcua),
            self.file("comm-a", "crt"),
            self.file("comm-a", "key"),
            self.file("ca", "crt"),
            self.users,
        )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


def make_site(tmp_path: Path) -> Site:
    own, other = tmp_path / "pki", tmp_path / "other"
    pki.init(own, "plant")
    pki.issue(own, "comm", "comm-a", ["127.0.0.1"])
    for name in ("scada", "alice-app"):
        pki.issue(own, "opcua-client", name)
    pki.issue(own, "comm", "plc-oven", ["127.0.0.1"])  # a PLC's OPC UA server
    pki.init(other, "elsewhere")
    pki.issue(other, "opcua-client", "scada")  # the same CN, another CA
    users = tmp_path / "opcua-users.yaml"
    users.write_text(
        json.dumps(
            {
                "users": {
                    "alice": {"role": "writer", "password": hash_password(PASSWORDS["alice"])},
                    "bob": {"role": "reader", "password": hash_password(PASSWORDS["bob"])},
                    "scada": {"role": "writer"},
                    "hmi-7": {"role": "writer"},
                }
            }
        )
    )
    os.chmod(users, 0o600)
    return Site(own, other, users)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusPlc]:
    plc = await ModbusPlc(["127.0.33.1"], free_port("127.0.33.1")).start()
    try:
        yield plc
    finally:
        await plc.stop()


def press(sim: ModbusPlc, **opcua: Any) -> str:
    plc = {
        "name": "press-1",
        "paths": [{"host": h, "port": sim.port} for h in sim.hosts],
        "poll_interval_s": 0.2,
        "timeout_s": 0.2,
        "tags": [{"name": "speed", "address": "HR100", "type": "int16", "writable": True}],
    }
    return json.dumps({"plcs": [plc], **({"opcua": opcua} if opcua else {})})


@dataclass(frozen=True)
class Way:
    """How a client comes in: its user, its certificate, its channel."""

    label: str
    user: str | None = None
    password: str | None = None
    cert: Path | None = None  # the channel's certificate (and, with x509, the user's)
    key: Path | None = None
    policy: str | None = None  # None: NoSecurity
    mode: str = "SignAndEncrypt"
    x509: bool = False  # the certificate is also the user's identity


def secure(site: Site, label: str, name: str = "alice-app", **kw: Any) -> Way:
    kw.setdefault("policy", "Basic256Sha256")
    return Way(label, cert=site.file(name, "crt"), key=site.file(name, "key"), **kw)


async def connect(url: str, way: Way) -> Client:
    client = Client(url, timeout=5)
    if way.user is not None:
        client.set_user(way.user)
        client.set_password(way.password or "")
    if way.policy is not None:
        assert way.cert is not None and way.key is not None
        await client.set_security(
            POLICIES[way.policy],
            pem(way.cert),
            pem(way.key),
            mode=getattr(ua.MessageSecurityMode, way.mode),
        )
        if way.x509:
            await client.load_client_certificate(str(way.cert), "pem")
            await client.load_private_key(str(way.key), extension="pem")
    await client.connect()
    return client


async def attempt(url: str, way: Way, action: Callable[[Client, int], Awaitable[Any]]) -> str:
    """What became of ``action`` made as ``way``: the status name, or why the session
    was refused."""
    try:
        client = await connect(url, way)
    except Exception as err:
        return f"session refused: {type(err).__name__}"
    try:
        ns = await client.get_namespace_index("urn:hapair:comm")
        return str(await action(client, ns))
    except ua.UaStatusCodeError as err:
        return f"refused: {type(err).__name__}"
    finally:
        await client.disconnect()


TAG = "ns={ns};s=press-1.speed"


def write(node: str, value: Any, vtype: Any) -> Callable[[Client, int], Awaitable[str]]:
    """Write ``value`` to ``node`` (``{ns}``: the comm server's namespace index)."""

    async def act(client: Client, ns: int) -> str:
        nodeid = ua.NodeId.from_string(node.format(ns=ns))
        [status] = await client.uaclient.write_attributes(
            [nodeid], [ua.DataValue(ua.Variant(value, vtype))], ua.AttributeIds.Value
        )
        return str(status.name)

    return act


def as_alice(site: Site) -> Callable[[Any], Awaitable[None]]:
    """The test's own observing client: alice over SignAndEncrypt."""

    async def setup(client: Any) -> None:
        client.set_user("alice")
        client.set_password(PASSWORDS["alice"])
        await client.set_security(
            POLICIES["Basic256Sha256"],
            pem(site.file("alice-app", "crt")),
            pem(site.file("alice-app", "key")),
        )

    return setup


async def speed_read(comm: CommUnderTest) -> None:
    """Wait until the poller has read the tag and both paths have answered (a first
    good value may come before the backup's probe): the server serves the PLC in full."""
    from tests.support.cluster import until

    async def good() -> bool:
        read = (await comm.read("press-1.speed")).StatusCode.is_good()
        return bool(read) and await comm.service_level() == 255

    await until(good, 5, "press-1.speed read, ServiceLevel 255")


@contextlib.asynccontextmanager
async def secured_comm(
    site: Site, sim: ModbusPlc, wait: bool = True, **opcua: Any
) -> AsyncIterator[CommUnderTest]:
    """A comm server in front of ``sim`` with its security on (``opcua`` its settings),
    observed by alice over SignAndEncrypt; once it has read the PLC, unless not ``wait``."""
    async with running_comm(
        press(sim), security=site.security(**opcua), client_setup=as_alice(site)
    ) as comm:
        if wait:
            await speed_read(comm)
        yield comm


async def test_anonymous_write_is_refused_and_never_reaches_the_plc(
    site: Site, sim: ModbusPlc
) -> None:
    async with secured_comm(site, sim) as comm:
        url = comm.server.space.url
        outcomes = {
            way.label: await attempt(url, way, write(TAG, 42, V.Int16))
            for way in (
                Way("anonymous, no security"),
                secure(site, "anonymous over SignAndEncrypt"),
            )
        }
        assert all("refused" in o for o in outcomes.values()), outcomes
        assert sim.writes == []
    # Anonymous clients allowed to read, explicitly: they read, and still never write.
    async with secured_comm(site, sim, anonymous="read") as comm:
        way = secure(site, "anonymous reader")

        async def read(client: Client, ns: int) -> str:
            dv = await client.get_node(f"ns={ns};s=press-1.speed").read_data_value()
            return str(dv.StatusCode.name)

        assert await attempt(comm.server.space.url, way, read) == "Good"
        written = await attempt(comm.server.space.url, way, write(TAG, 42, V.Int16))
        assert written == "BadUserAccessDenied"
        assert sim.writes == []


async def test_admin_or_a_user_with_a_wrong_password_is_refused(site: Site, sim: ModbusPlc) -> None:
    async with secured_comm(site, sim, wait=False) as comm:
        url = comm.server.space.url
        ways = [
            Way("admin, no security", user="admin", password="anything"),
            secure(site, "admin", user="admin", password="anything"),
            secure(site, "alice, wrong password", user="alice", password="guess"),
            secure(site, "bob, alice's password", user="bob", password=PASSWORDS["alice"]),
        ]
        outcomes = {w.label: await attempt(url, w, write(TAG, 7, V.Int16)) for w in ways}
        assert all(o.startswith("session refused") for o in outcomes.values()), outcomes
        assert sim.writes == []
        # A writer may write tags, not change the address space.
        node = comm.node("press-1.speed")
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await comm.client.uaclient.delete_nodes(
                ua.DeleteNodesParameters(NodesToDelete=[ua.DeleteNodesItem(NodeId=node.nodeid)])
            )
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await comm.client.nodes.objects.add_folder(comm.ns, "intruder")
        assert await node.read_browse_name()  # still there


async def test_no_user_may_write_service_level_redundancy_or_role_nodes(
    site: Site, sim: ModbusPlc
) -> None:
    async with secured_comm(site, sim, anonymous="read") as comm:
        url = comm.server.space.url
        before = await comm.service_level()
        ways = [
            secure(site, "alice (writer)", user="alice", password=PASSWORDS["alice"]),
            secure(site, "bob (reader)", user="bob", password=PASSWORDS["bob"]),
            secure(site, "scada (writer by certificate)", name="scada", x509=True),
            secure(site, "anonymous reader"),
            Way("admin, no security", user="admin", password="anything"),
            secure(site, "admin", user="admin", password="anything"),
        ]
        targets = [
            (SERVICE_LEVEL, 1, V.Byte),  # the active serves at 255: 1 would be seen
            (REDUNDANCY_SUPPORT, 0, V.Int32),
            ("ns={ns};s=_comm.role", "active", V.String),
            ("ns={ns};s=press-1._state", "ok", V.String),
        ]

        async def every_target(client: Client, ns: int) -> str:
            return " ".join([await write(*target)(client, ns) for target in targets])

        outcomes = {way.label: await attempt(url, way, every_target) for way in ways}
        # Users come in (admin does not) and every one of their writes is refused.
        refused = " ".join(["BadUserAccessDenied"] * len(targets))
        assert outcomes == {
            **{w.label: refused for w in ways[:4]},
            **{w.label: outcomes[w.label] for w in ways[4:]},
        }
        assert all(outcomes[w.label].startswith("session refused") for w in ways[4:]), outcomes
        assert await comm.service_level() == before
        role = await comm.client.get_node(f"ns={comm.ns};s=_comm.role").read_value()
        assert role == comm.server.role.state  # type: ignore[union-attr]
    # The lab's server: anonymous clients write tags, never ServiceLevel.
    async with running_comm(press(sim, security="none")) as comm:
        await speed_read(comm)
        way = Way("anonymous, lab")
        url = comm.server.space.url
        assert await attempt(url, way, write(SERVICE_LEVEL, 1, V.Byte)) != "Good"
        admin = Way("admin, lab", user="admin", password="anything")
        assert (await attempt(url, admin, write(TAG, 5, V.Int16))).startswith("session refused")
        assert await comm.service_level() == 255  # the active's, every PLC answering


async def test_a_writers_write_reaches_the_plc_over_sign_and_encrypt(
    site: Site, sim: ModbusPlc
) -> None:
    async with secured_comm(site, sim) as comm:
        url = comm.server.space.url
        offered = {
            (e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode.name)
            for e in await comm.client.get_endpoints()
        }
        assert offered == {
            (p, m)
            for p in ("Basic256Sha256", "Aes256_Sha256_RsaPss")
            for m in ("Sign", "SignAndEncrypt")
        }
        # Her password over a NoSecurity channel: no session (asyncua would allow it).
        plain = Way("alice, no security", user="alice", password=PASSWORDS["alice"])
        assert (await attempt(url, plain, write(TAG, 41, V.Int16))).startswith("session refused")
        assert sim.writes == []
        alice = secure(site, "alice", user="alice", password=PASSWORDS["alice"])
        assert await attempt(url, alice, write(TAG, 42, V.Int16)) == "Good"
        assert [(w.area, w.address, w.values) for w in sim.writes] == [("HR", 100, [42])]
        scada = secure(
            site, "scada by certificate", name="scada", x509=True, policy="Aes256_Sha256_RsaPss"
        )
        assert await attempt(url, scada, write(TAG, 43, V.Int16)) == "Good"
        bob = secure(site, "bob", user="bob", password=PASSWORDS["bob"], mode="Sign")
        assert await attempt(url, bob, write(TAG, 44, V.Int16)) == "BadUserAccessDenied"
        assert [w.values for w in sim.writes] == [[42], [43]]
        # The same CN from another CA is nobody: its channel is refused.
        intruder = Way(
            "scada from another CA",
            cert=site.other / "scada.crt",
            key=site.other / "scada.key",
            policy="Basic256Sha256",
            x509=True,
        )
        outcome = await attempt(url, intruder, write(TAG, 45, V.Int16))
        assert outcome.startswith("session refused")
        assert [w.values for w in sim.writes] == [[42], [43]]


async def test_an_opcua_client_certificate_from_hapair_pki_is_let_in_over_sign_and_encrypt(
    site: Site, sim: ModbusPlc
) -> None:
    """``hapair pki issue DIR opcua-client NAME`` (RSA 3072 here): a client showing it,
    set up as the client library sets up its own (its certificate's application URI
    announced, the server's checked against the site CA), opens a SignAndEncrypt
    channel; the comm server, trusting the site CA (``--opcua-ca``), takes the
    certificate as the user its CN names, and that writer's write reaches the PLC."""
    bits = ("--rsa-bits", "3072")
    issued = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "hapair"), "pki", "issue", str(site.pki), "opcua-client", "hmi-7", *bits],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issued.returncode == 0, issued.stderr
    cert, key = site.file("hmi-7", "crt"), site.file("hmi-7", "key")
    assert application_uri(pki.load_certificate(cert)) == "urn:hapair:opcua-client:hmi-7"
    async with secured_comm(site, sim) as comm:
        client = Client(comm.server.space.url, timeout=5)
        await ClientSecurity(cert, key, site.file("ca", "crt")).apply(client)
        assert client.application_uri == "urn:hapair:opcua-client:hmi-7"
        # The certificate is also the user's identity (no user name, no password).
        await client.load_client_certificate(str(cert), "pem")
        await client.load_private_key(key, extension="pem")
        async with client:
            assert client.security_policy.Mode == ua.MessageSecurityMode.SignAndEncrypt
            ns = await client.get_namespace_index("urn:hapair:comm")
            assert await write(TAG, 47, V.Int16)(client, ns) == "Good"
        assert [w.values for w in sim.writes] == [[47]]
