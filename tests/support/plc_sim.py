"""Simulated PLCs for tests and benchmarks: real pymodbus and asyncua servers.

A :class:`ModbusPlc` is one device memory (coils, discrete inputs, input and holding
registers, each 0-based from 0) served by one pymodbus TCP server per network path, on
its own 127.x address: cutting a path stops that listener and its connections. It
counts the requests each path received and records every write; it can answer with
exception codes for chosen addresses, or mangle its replies (``garbage``).

An :class:`OpcUaPlc` is one set of variables served by one asyncua server per path.

Run as a script it starts a farm of Modbus PLCs in its own process, for the benchmarks:
``python -m tests.support.plc_sim --plcs 100 --registers 200 --port 31000 [--change-rate N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
logging.getLogger("asyncua").setLevel(logging.ERROR)

AREAS = ("C", "DI", "HR", "IR")
_FC_AREA = {1: "C", 5: "C", 15: "C", 2: "DI", 3: "HR", 6: "HR", 16: "HR", 23: "HR", 4: "IR"}
_WRITE_FCS = {5, 6, 15, 16}
DT = AsyncModbusTcpClient.DATATYPE


def to_registers(value: float | int, kind: str, word_order: str = "big") -> list[int]:
    """pymodbus's own encoder, so tests do not check our codec against itself."""
    datatype = {
        "int16": DT.INT16,
        "uint16": DT.UINT16,
        "int32": DT.INT32,
        "uint32": DT.UINT32,
        "int64": DT.INT64,
        "uint64": DT.UINT64,
        "float32": DT.FLOAT32,
        "float64": DT.FLOAT64,
    }[kind]
    regs: list[int] = AsyncModbusTcpClient.convert_to_registers(
        value, datatype, word_order=word_order
    )
    return regs


@dataclass
class Write:
    area: str
    address: int
    values: list[Any]


@dataclass
class ModbusPlc:
    hosts: list[str]
    port: int
    unit: int = 1
    size: int = 1000  # addresses per area
    servers: list[ModbusTcpServer | None] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)  # per path
    writes: list[Write] = field(default_factory=list)
    # (area, address) -> exception code answered for any request covering it
    exceptions: dict[tuple[str, int], ExcCodes] = field(default_factory=dict)
    garbage: Callable[[bytes], bytes] | None = None  # rewrites every reply
    # paths through a gateway that lost the device: every reply there is exception 4
    failing_paths: set[int] = field(default_factory=set)
    hold: asyncio.Event | None = None  # a write is received, its reply waits for this
    # a read is received, its reply waits for this; ``reads_held`` is set meanwhile
    hold_reads: asyncio.Event | None = None
    reads_held: asyncio.Event = field(default_factory=asyncio.Event)
    _core: Any = None

    async def start(self) -> ModbusPlc:
        self.servers = [None] * len(self.hosts)
        self.requests = [0] * len(self.hosts)
        for i in range(len(self.hosts)):
            await self.start_path(i)
        return self

    def _device(self) -> SimDevice:
        def block(bits: bool) -> list[SimData]:
            kind = DataType.BITS if bits else DataType.REGISTERS
            return [SimData(0, values=[False if bits else 0] * self.size, datatype=kind)]

        return SimDevice(
            id=self.unit,
            simdata=(block(True), block(True), block(False), block(False)),
            action=self._action,
        )

    async def start_path(self, i: int) -> None:
        server = ModbusTcpServer(
            self._device(),
            address=(self.hosts[i], self.port),
            trace_packet=lambda sending, data, i=i: self._trace_packet(i, sending, data),
            trace_pdu=lambda sending, pdu, i=i: self._trace_pdu(i, sending, pdu),
        )
        if self._core is None:
            self._core = server.context
        server.context = self._core  # every path serves the same memory
        await server.serve_forever(background=True)
        self.servers[i] = server

    async def stop_path(self, i: int) -> None:
        """Cut a path: the listener and every connection through it go away."""
        server, self.servers[i] = self.servers[i], None
        if server is not None:
            await server.shutdown()

    async def stop(self) -> None:
        for i in range(len(self.servers)):
            await self.stop_path(i)

    # -- hooks ------------------------------------------------------------------------
    def _trace_pdu(self, path: int, sending: bool, pdu: Any) -> Any:
        if not sending:
            self.requests[path] += 1
        return pdu

    def _trace_packet(self, path: int, sending: bool, data: bytes) -> bytes:
        if sending and path in self.failing_paths:
            return device_failure(data)
        if sending and self.garbage is not None:
            return self.garbage(data)
        return data

    async def _action(
        self,
        fc: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        area = _FC_AREA.get(fc, "?")
        from_client = values is None or fc in _WRITE_FCS  # not our own set()
        for (a, addr), code in self.exceptions.items() if from_client else ():
            if a == area and address <= addr < address + count:
                return code
        if values is not None and fc in _WRITE_FCS:
            self.writes.append(Write(area, address, list(values)))
            if self.hold is not None:
                await self.hold.wait()
        elif values is None and self.hold_reads is not None:
            self.reads_held.set()
            await self.hold_reads.wait()
        return None

    # -- memory -----------------------------------------------------------------------
    async def set(self, area: str, address: int, values: list[int] | list[bool]) -> None:
        fc = {"C": 1, "DI": 2, "HR": 3, "IR": 4}[area]
        await self._core.async_setValues(self.unit, fc, address, values)

    async def get(self, area: str, address: int, count: int = 1) -> list[Any]:
        fc = {"C": 1, "DI": 2, "HR": 3, "IR": 4}[area]
        values: list[Any] = await self._core.async_getValues(self.unit, fc, address, count)
        return values

    async def set_value(
        self, area: str, address: int, value: float | int, kind: str, word_order: str = "big"
    ) -> None:
        await self.set(area, address, to_registers(value, kind, word_order))


# -- reply manglers (for ``ModbusPlc.garbage``) ------------------------------------------
def _split(packet: bytes) -> tuple[int, int, bytes]:
    tid, _, _, unit = struct.unpack(">HHHB", packet[:7])
    return tid, unit, packet[7:]


def _join(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def short_reply(packet: bytes) -> bytes:
    """A well-formed reply that carries one register (two bytes) less than asked."""
    tid, unit, pdu = _split(packet)
    if pdu[0] & 0x80 or pdu[0] not in (3, 4):
        return packet
    body = pdu[2:-2]
    return _join(tid, unit, bytes([pdu[0], len(body)]) + body)


def wrong_function(packet: bytes) -> bytes:
    """Answer a holding-register read as if input registers had been asked."""
    tid, unit, pdu = _split(packet)
    if pdu[0] != 3:
        return packet
    return _join(tid, unit, bytes([4]) + pdu[1:])


def device_failure(packet: bytes) -> bytes:
    """Exception 4 (server device failure) in answer to whatever was asked."""
    tid, unit, pdu = _split(packet)
    return _join(tid, unit, bytes([(pdu[0] & 0x7F) | 0x80, 4]))


def noise(packet: bytes) -> bytes:
    return b"\x01\x02\x03 this is not modbus"


# -- OPC UA ------------------------------------------------------------------------------
@dataclass
class OpcUaPlc:
    """Variables ``ns=2;s=NAME`` on one asyncua server per path (namespace urn:plc-sim)."""

    urls: list[str]
    variables: dict[str, tuple[ua.VariantType, Any]]
    servers: list[Server | None] = field(default_factory=list)
    writes: list[tuple[str, Any]] = field(default_factory=list)
    # (certificate, key) files: SignAndEncrypt endpoints only, clients with a
    # certificate ``trusted`` issued (None: any), as a PLC set up for security is
    secure: tuple[str, str] | None = None
    trusted: Any = None  # an x509.Certificate
    sessions: list[str] = field(default_factory=list)  # the client URIs it let in

    async def start(self) -> OpcUaPlc:
        self.servers = [None] * len(self.urls)
        for i in range(len(self.urls)):
            await self.start_path(i)
        return self

    async def start_path(self, i: int) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(self.urls[i])
        if self.secure is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await server.load_certificate(self.secure[0], format="pem")
            await server.load_private_key(self.secure[1], format="pem")
            server.set_security_policy(
                [
                    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
                ]
            )
            server.set_certificate_validator(self._validate)
        ns = await server.register_namespace("urn:plc-sim")
        assert ns == 2
        folder = await server.nodes.objects.add_folder(ns, "plc")
        for name, (vtype, value) in self.variables.items():
            var = await folder.add_variable(ua.NodeId(name, ns), name, value, vtype)
            await var.set_writable()
        server.subscribe_server_callback(CallbackType.PostWrite, self._written)
        await server.start()
        self.servers[i] = server

    async def _validate(self, certificate: Any, description: Any) -> None:
        if self.trusted is not None:
            certificate.verify_directly_issued_by(self.trusted)  # raises: refused
        self.sessions.append(description.ApplicationUri)

    def _written(self, event: Any, dispatcher: Any) -> None:
        for item, status in zip(
            event.request_params.NodesToWrite, event.response_params, strict=True
        ):
            if status.is_good() and item.NodeId.NamespaceIndex == 2:  # not the server's own
                self.writes.append((item.NodeId.Identifier, item.Value.Value.Value))

    async def stop_path(self, i: int) -> None:
        server, self.servers[i] = self.servers[i], None
        if server is not None:
            await server.stop()

    def answer_bad(self, path: int, status: int) -> None:
        """The server on ``path`` answers ``status`` for every variable, as a gateway
        that lost its device does (until ``set`` gives a variable a value again)."""
        server = self.servers[path]
        assert server is not None
        for name in self.variables:
            node = server.iserver.aspace[ua.NodeId(name, 2)]
            node.attributes[ua.AttributeIds.Value].value = ua.DataValue(
                StatusCode=ua.StatusCode(status)
            )

    async def stop(self) -> None:
        for i in range(len(self.servers)):
            await self.stop_path(i)

    def set(self, name: str, value: Any, vtype: ua.VariantType | None = None) -> None:
        """Set a variable on every running path (``vtype`` may differ: a wrong type)."""
        kind = vtype or self.variables[name][0]
        for server in self.servers:
            if server is not None:
                # Straight into the address space: asyncua would refuse a change of type,
                # and a faulty PLC is what we want to play.
                node = server.iserver.aspace[ua.NodeId(name, 2)]
                node.attributes[ua.AttributeIds.Value].value = ua.DataValue(ua.Variant(value, kind))


# -- a farm of Modbus PLCs in its own process, for the benchmarks ---------------------------
async def farm(plcs: int, registers: int, port: int, host: str, change_rate: float) -> None:
    """``plcs`` PLCs on ``host``, ports ``port``.., each with ``registers`` holding
    registers counting up; with ``change_rate`` > 0, that many register pairs (float32
    values) change per second in total, spread over the PLCs."""
    sims = [await ModbusPlc([host], port + i, size=max(registers, 16)).start() for i in range(plcs)]
    for sim in sims:
        await sim.set("HR", 0, list(range(registers)))
    # Real PLCs do not pause to collect garbage; keep the simulators from doing it on
    # their long-lived state, so replies come as promptly as the CPU allows.
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    if change_rate <= 0:
        await asyncio.Event().wait()
    tick = 0.01
    per_tick = change_rate * tick
    owed = 0.0
    value = 0.0
    cursor = 0
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    pairs = registers // 2
    while True:
        owed += per_tick
        while owed >= 1:
            owed -= 1
            sim = sims[cursor % plcs]
            at = (cursor // plcs) % pairs
            value += 1.0
            await sim.set("HR", 2 * at, to_registers(value, "float32"))
            cursor += 1
        next_at += tick
        await asyncio.sleep(max(0.0, next_at - loop.time()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plcs", type=int, default=100)
    p.add_argument("--registers", type=int, default=200)
    p.add_argument("--port", type=int, default=31000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--change-rate", type=float, default=0.0)
    args = p.parse_args()
    try:
        import uvloop

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(farm(args.plcs, args.registers, args.port, args.host, args.change_rate))


if __name__ == "__main__":
    main()


# -- a comm server under test, in this process -----------------------------------------
class CommUnderTest:
    """A :class:`CommServer` on a free port, with an independent asyncua client on it."""

    def __init__(self, server: Any, client: Any, ns: int, port: int = 0) -> None:
        self.server = server
        self.client = client
        self.ns = ns
        self.port = port  # of its OPC UA server

    def node(self, key: str) -> Any:
        return self.client.get_node(f"ns={self.ns};s={key}")

    async def read(self, key: str) -> Any:
        """The DataValue of ``{plc}.{tag}`` as a client reads it (bad ones too)."""
        return await self.node(key).read_data_value(raise_on_bad_status=False)

    async def service_level(self) -> int:
        level: int = await self.client.get_node("ns=0;i=2267").read_value()
        return level

    async def write(self, key: str, value: Any, vtype: ua.VariantType) -> Any:
        """Write as a client would; the StatusCode the server answered."""
        [status] = await self.client.uaclient.write_attributes(
            [self.node(key).nodeid], [ua.DataValue(ua.Variant(value, vtype))], ua.AttributeIds.Value
        )
        return status


@contextlib.asynccontextmanager
async def running_comm(
    config: str,
    role: Callable[..., Any] | None = None,
    host: str = "127.0.0.1",
    security: Any = None,
    client_setup: Callable[[Any], Any] | None = None,
) -> Any:
    """Start a comm server for ``config`` (YAML) in this process; stop it afterwards.

    ``role(parts, on_change)`` makes its role; without one it is the active, alone.
    Without ``security`` (a ``ServerSecurity``) it serves as a lab does, without
    security, unless ``config`` says otherwise; ``client_setup(client)`` prepares the
    test's own client (its user, its certificate) before it connects."""
    from asyncua import Client

    from hapair.comm_server.app import CommServer, Listen
    from hapair.comm_server.config import loads
    from hapair.comm_server.role import StaticRole
    from hapair.shared.log import EventLog
    from hapair.shared.topology import OpcUaSecurity
    from tests.support.harness import free_port

    listen = Listen(host, free_port(host))
    parsed = loads(config)
    if security is None and "opcua" not in parsed.model_fields_set:
        parsed = parsed.model_copy(update={"opcua": OpcUaSecurity(security="none")})
    server = CommServer(parsed, listen, EventLog("hapair.comm"), security=security)
    await server.start(role or (lambda parts, on_change: StaticRole()))
    # The client's watchdog reads the server's state every watchdog_intervall and
    # drops the connection for good if an answer takes longer: the server runs on this
    # test's own loop, which a second server starting (its address space is built in
    # one go) or a loaded machine can hold for a second.
    client = Client(listen.url, timeout=5, watchdog_intervall=5.0)
    try:
        if client_setup is not None:
            await client_setup(client)
        await client.connect()
        ns = await client.get_namespace_index("urn:hapair:comm")
        yield CommUnderTest(server, client, ns, listen.port)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        await server.stop()
