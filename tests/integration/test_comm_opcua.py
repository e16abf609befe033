"""A PLC with its own OPC UA server (real asyncua servers, one per path) behind the comm
server, read by an independent asyncua client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from asyncua import ua

from hapair.comm_server.access import ServerSecurity
from hapair.comm_server.opcua_plc import OpcUaDriver
from hapair.shared import pki
from hapair.shared.plcs import OpcUaPlc as OpcUaPlcConfig
from tests.integration.test_comm_modbus import NO_PRIVATE_NETWORK, blackholed_write, in_own_network
from tests.integration.test_comm_security import make_site
from tests.support.cluster import until
from tests.support.harness import free_port
from tests.support.plc_sim import CommUnderTest, OpcUaPlc, running_comm

S = ua.StatusCodes
V = ua.VariantType


async def read_is(comm: CommUnderTest, key: str, check: object) -> bool:
    dv = await comm.read(key)
    return bool(check(dv))  # type: ignore[operator]


def good(value: object) -> object:
    return lambda dv: dv.StatusCode.is_good() and dv.Value.Value == value


def oven(urls: list[str], tags: list[dict[str, object]], **opts: object) -> str:
    """The comm server's list: PLC oven-1 over ``urls``, polled every 0.2 s."""
    plc = {
        "name": "oven-1",
        "protocol": "opcua",
        "paths": [{"url": u} for u in urls],
        "poll_interval_s": 0.2,
        "timeout_s": 0.2,
        "probe_interval_s": 0.2,
        **opts,
        "tags": tags,
    }
    return json.dumps({"plcs": [plc]})


async def test_opcua_plc_values_types_writes_and_path_cut() -> None:
    hosts = ["127.0.32.1", "127.0.32.2"]
    port = free_port(hosts[0])
    urls = [f"opc.tcp://{h}:{port}/" for h in hosts]
    plc = await OpcUaPlc(
        urls,
        {
            "Oven.Temp": (V.Double, 180.5),
            "Oven.Setpoint": (V.Float, 175.0),
            "Oven.Door": (V.Boolean, False),
            "Oven.Batch": (V.String, "B-17"),
            "Oven.Count": (V.Int32, 3),
        },
    ).start()
    cfg = oven(
        urls,
        [
            {"name": "temp", "node": "ns=2;s=Oven.Temp", "type": "double"},
            {"name": "sp", "node": "ns=2;s=Oven.Setpoint", "type": "float", "writable": True},
            {"name": "door", "node": "ns=2;s=Oven.Door", "type": "bool"},
            {"name": "batch", "node": "ns=2;s=Oven.Batch", "type": "string"},
            # declared wider than the PLC's Int32: accepted, served as Int64
            {"name": "count", "node": "ns=2;s=Oven.Count", "type": "int64"},
            {"name": "ghost", "node": "ns=2;s=Oven.Nothing", "type": "double"},
        ],
    )
    try:
        async with running_comm(cfg) as comm:
            await until(lambda: read_is(comm, "oven-1.temp", good(180.5)), 5, "temp read")
            assert (await comm.read("oven-1.batch")).Value.Value == "B-17"
            count = await comm.read("oven-1.count")
            assert (count.Value.Value, count.Value.VariantType) == (3, V.Int64)
            # a node the PLC does not have: bad, with the PLC's own reason
            ghost = await comm.read("oven-1.ghost")
            assert ghost.StatusCode.value == S.BadNodeIdUnknown
            poller = comm.server.pollers[0]
            assert poller.table.tags[5].reason == "PLC reports BadNodeIdUnknown"
            # the PLC now holds a string where a double was declared: bad, never passed on
            plc.set("Oven.Temp", "hot", V.String)
            await until(
                lambda: read_is(
                    comm, "oven-1.temp", lambda dv: dv.StatusCode.value == S.BadTypeMismatch
                ),
                3,
                "type mismatch",
            )
            assert poller.table.tags[0].reason == "type mismatch: String where Double was expected"
            plc.set("Oven.Temp", 181.0)
            await until(lambda: read_is(comm, "oven-1.temp", good(181.0)), 3, "temp good again")
            # a write reaches the PLC once
            answer = await comm.write("oven-1.sp", 190.0, V.Float)
            assert answer.is_good()
            assert plc.writes == [("Oven.Setpoint", 190.0)]
            await until(lambda: read_is(comm, "oven-1.sp", good(190.0)), 3, "setpoint read back")
            # primary cut: the backup serves, within the interval plus a reconnect
            await plc.stop_path(0)
            plc.set("Oven.Temp", 182.5)  # only the backup is there to see it
            await until(lambda: read_is(comm, "oven-1.temp", good(182.5)), 1.5, "temp via backup")
            assert poller.switch.current == 1
            assert await comm.service_level() < 200  # one path lost: degraded
    finally:
        await plc.stop()


async def test_a_path_answering_bad_for_every_node_is_a_failed_path() -> None:
    """The OPC UA server on the primary path (a gateway) lost its device and answers
    BadNotConnected for every node: the backup is used; once the backup answers
    BadCommunicationError for everything too, the PLC is unreachable and reported lost."""
    hosts = ["127.0.32.3", "127.0.32.4"]
    port = free_port(hosts[0])
    urls = [f"opc.tcp://{h}:{port}/" for h in hosts]
    plc = await OpcUaPlc(
        urls, {"Oven.Temp": (V.Double, 180.5), "Oven.Door": (V.Boolean, False)}
    ).start()
    tags = [
        {"name": "temp", "node": "ns=2;s=Oven.Temp", "type": "double"},
        {"name": "door", "node": "ns=2;s=Oven.Door", "type": "bool"},
    ]
    cfg = oven(urls, tags, critical=True)
    try:
        async with running_comm(cfg) as comm:
            await until(lambda: read_is(comm, "oven-1.temp", good(180.5)), 5, "temp read")
            plc.answer_bad(0, S.BadNotConnected)
            poller = comm.server.pollers[0]

            async def on_backup() -> bool:
                return poller.switch.current == 1

            await until(on_backup, 2, "the backup in use")
            await until(
                lambda: read_is(comm, "oven-1._state", lambda dv: "degraded" in dv.Value.Value),
                2,
                "degraded",
            )
            state = (await comm.read("oven-1._state")).Value.Value
            assert f"primary {urls[0]} down (every node bad: BadNotConnected)" in state, state
            assert (await comm.read("oven-1.temp")).StatusCode.is_good()
            assert await comm.service_level() < 200
            plc.answer_bad(1, S.BadCommunicationError)

            async def no_data() -> bool:
                return await comm.service_level() == 0

            await until(no_data, 3, "ServiceLevel 0: no data")
            resources, _ = comm.server._report_parts()
            assert not resources["plc:oven-1"].ok
            temp = await comm.read("oven-1.temp")
            assert not temp.StatusCode.is_good()
    finally:
        await plc.stop()


@pytest.mark.skipif(NO_PRIVATE_NETWORK is not None, reason=f"{NO_PRIVATE_NETWORK}")
def test_a_write_the_opcua_plc_has_not_acknowledged_within_the_fence_margin_never_reaches_it() -> (
    None
):
    """As for Modbus (test_comm_modbus.py): a write sent on a path that loses every
    packet until the fence margin has passed is never delivered late."""

    async def scenario() -> None:
        port = free_port()
        url = f"opc.tcp://127.0.0.1:{port}/"
        plc = await OpcUaPlc([url], {"Oven.Setpoint": (V.Float, 175.0)}).start()
        tag = {"name": "sp", "node": "ns=2;s=Oven.Setpoint", "type": "float", "writable": True}
        spec = json.loads(oven([url], [tag], poll_interval_s=10, timeout_s=5))["plcs"][0]
        driver = OpcUaDriver(OpcUaPlcConfig.model_validate(spec))
        try:
            await driver.probe(0)  # connected, and the path works
            client = driver.clients[0]
            assert client is not None and client.uaclient.protocol is not None
            live = client.uaclient.protocol.transport
            await blackholed_write(driver, port, 180.0, lambda: bool(plc.writes), live, asks=1)
        finally:
            await driver.close()
            await plc.stop()

    in_own_network(scenario)


@pytest.mark.long
async def test_a_plc_with_security_is_read_and_written_over_sign_and_encrypt(
    tmp_path: Path,
) -> None:
    """The PLC's OPC UA server offers SignAndEncrypt only and lets in clients whose
    certificate the site CA issued: the comm server shows its own, checks the PLC's
    against the CA named in ``trust``, reads and writes; without ``security`` the PLC
    is unreachable (no endpoint it could use), and a PLC whose certificate the CA did
    not issue is refused."""
    site = make_site(tmp_path)
    url = f"opc.tcp://127.0.0.1:{free_port()}/"
    plc = OpcUaPlc(
        [url],
        {"Oven.Temp": (V.Double, 180.5), "Oven.Setpoint": (V.Float, 175.0)},
        secure=(str(site.file("plc-oven", "crt")), str(site.file("plc-oven", "key"))),
        trusted=pki.load_certificate(site.file("ca", "crt")),
    )
    await plc.start()
    tags = [
        {"name": "temp", "node": "ns=2;s=Oven.Temp", "type": "double"},
        {"name": "sp", "node": "ns=2;s=Oven.Setpoint", "type": "float", "writable": True},
    ]
    secured = {"trust": str(site.file("ca", "crt")), "policy": "Aes256_Sha256_RsaPss"}
    identity = (site.file("comm-a", "crt"), site.file("comm-a", "key"))
    try:
        async with running_comm(
            oven([url], tags, security=secured), security=ServerSecurity.lab(identity)
        ) as comm:
            await until(lambda: read_is(comm, "oven-1.temp", good(180.5)), 5, "temp read")
            assert (await comm.write("oven-1.sp", 190.0, V.Float)).is_good()
            assert plc.writes == [("Oven.Setpoint", 190.0)]
            assert set(plc.sessions) == {"urn:hapair:comm:comm-a"}
        # Without security: the PLC offers nothing the comm server may use.
        async with running_comm(oven([url], tags)) as comm:
            await until(
                lambda: read_is(comm, "oven-1.temp", lambda dv: not dv.StatusCode.is_good()),
                3,
                "temp bad",
            )
            await asyncio.sleep(1.0)  # polls go on: none may get through
            assert not (await comm.read("oven-1.temp")).StatusCode.is_good()
        # A CA that did not issue the PLC's certificate: the PLC is not trusted.
        elsewhere = {"trust": str(site.other / "ca.crt")}
        async with running_comm(
            oven([url], tags, security=elsewhere), security=ServerSecurity.lab(identity)
        ) as comm:
            await asyncio.sleep(1.5)  # several polls and reconnects
            assert not (await comm.read("oven-1.temp")).StatusCode.is_good()
            reason = comm.server.pollers[0].describe()
            assert "untrusted" in reason.lower() or "cannot connect" in reason, reason
        assert plc.writes == [("Oven.Setpoint", 190.0)]
    finally:
        await plc.stop()
