"""PLCs with their own OPC UA server, read through asyncua's client.

One Read request per poll carries every tag. A value the PLC marks bad is bad here,
with the PLC's status name as the reason; a value of another type than configured
(a String where a Double was declared) is bad as a type mismatch, never passed on.
A reply in which every value is bad or uncertain (a gateway that lost its device
answers BadNotConnected for each) gives no data: that is a failure of the path, and
the other path is tried. A probe reads the tags too, so such a path shows as down.

A write asks whether it may still be sent in the same synchronous step that hands its
bytes to the socket: it goes to the connection's protocol directly, not through
asyncua's request path, which may wait (for a free request slot, for a reconnect)
after any check made before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hapair.comm_server.codec import INTEGER_RANGE, Value
from hapair.comm_server.driver import Driver, PathError, WriteError, bound_unacked
from hapair.comm_server.tags import TagTable
from hapair.comm_server.uatypes import Client, S, struct_from_binary, ua
from hapair.shared.opcua_security import ClientSecurity
from hapair.shared.plcs import OpcUaPlc

VARIANT = {
    "bool": ua.VariantType.Boolean,
    "int16": ua.VariantType.Int16,
    "uint16": ua.VariantType.UInt16,
    "int32": ua.VariantType.Int32,
    "uint32": ua.VariantType.UInt32,
    "int64": ua.VariantType.Int64,
    "uint64": ua.VariantType.UInt64,
    "float32": ua.VariantType.Float,
    "float64": ua.VariantType.Double,
    "string": ua.VariantType.String,
}
_NUMERIC = {
    ua.VariantType.SByte,
    ua.VariantType.Byte,
    ua.VariantType.Int16,
    ua.VariantType.UInt16,
    ua.VariantType.Int32,
    ua.VariantType.UInt32,
    ua.VariantType.Int64,
    ua.VariantType.UInt64,
    ua.VariantType.Float,
    ua.VariantType.Double,
}
_SERVER_STATE = ua.NodeId(ua.ObjectIds.Server_ServerStatus_State)
_FAILURES = (OSError, TimeoutError, ConnectionError, ua.UaError, asyncio.IncompleteReadError)


def status_name(code: int) -> str:
    try:
        name: str = ua.StatusCode(code).name
    except Exception:  # a code asyncua does not know
        return f"0x{code:08X}"
    return name


class OutOfRange(ValueError):
    """A number of the right kind that does not fit the tag's type."""


def convert(type_: str, variant: Any) -> Value:
    """The PLC's (or a writer's) variant as a value of ``type_``; ValueError if it is not."""
    vtype, value = variant.VariantType, variant.Value
    wanted = VARIANT[type_]
    if vtype == wanted and not isinstance(value, list):
        return value  # type: ignore[no-any-return]
    if type_ in ("bool", "string") or vtype not in _NUMERIC or isinstance(value, list):
        raise ValueError(f"{vtype.name} where {wanted.name} was expected")
    if type_ in ("float32", "float64"):
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value} is not a whole number for {wanted.name}")
    low, high = INTEGER_RANGE[type_]
    if not low <= int(value) <= high:
        raise OutOfRange(f"{value} is out of range for {wanted.name}")
    return int(value)


class OpcUaDriver(Driver):
    def __init__(self, plc: OpcUaPlc, identity: tuple[Path, Path] | None = None) -> None:
        """``identity``: the comm server's certificate and key, shown to a PLC whose
        ``security`` is set (required then)."""
        self.plc = plc
        self.security = (
            None
            if plc.security is None or identity is None
            else ClientSecurity(
                identity[0],
                identity[1],
                Path(plc.security.trust),
                plc.security.policy,
                plc.security.mode,
            )
        )
        if plc.security is not None and self.security is None:
            raise ValueError(f"PLC {plc.name}: security needs the comm server's certificate")
        self.tags = plc.tags
        self.endpoints = [p.url for p in plc.paths]
        self.timeout = plc.timeout
        self.nodes = [ua.NodeId.from_string(t.node) for t in plc.tags]
        self.clients: list[Client | None] = [None] * len(plc.paths)
        self.requests = 0
        self._connecting = [asyncio.Lock() for _ in plc.paths]  # one session per path

    async def _client(self, path: int) -> Client:
        if self.clients[path] is None:
            async with self._connecting[path]:
                if self.clients[path] is None:
                    self.clients[path] = await self._connect(path)
        client = self.clients[path]
        if client is None:  # dropped by a failure meanwhile
            raise PathError("connection lost")
        return client

    async def _connect(self, path: int) -> Client:
        client = Client(self.endpoints[path], timeout=self.timeout)
        client.session_timeout = 30_000
        try:
            # A session takes a few round trips; allow at least a second for them.
            async with asyncio.timeout(max(1.0, self.timeout)):
                if self.security is not None:  # asks the PLC for its certificate first
                    await self.security.apply(client)
                await client.connect()
            # Before the session is handed to any write (see comm_server.driver).
            protocol = client.uaclient.protocol
            bound_unacked(protocol.transport if protocol is not None else None)
        except Exception as err:  # whatever went wrong, this path is not usable now
            await _drop(client)
            raise PathError(_describe(err, "cannot connect")) from None
        return client

    async def _fail(self, path: int, client: Client, err: BaseException) -> PathError:
        """Drop the session that failed (not one a probe may have opened since)."""
        if self.clients[path] is client:
            self.clients[path] = None
        await _drop(client)
        return PathError(_describe(err, "request failed"))

    async def read(self, path: int, table: TagTable, when: float) -> None:
        client = await self._client(path)
        self.requests += 1
        try:
            async with asyncio.timeout(self.timeout):
                values = await client.uaclient.read_attributes(self.nodes, ua.AttributeIds.Value)
        except _FAILURES as err:
            raise await self._fail(path, client, err) from None
        if len(values) != len(self.nodes):
            raise PathError(f"reply carries {len(values)} values, {len(self.nodes)} were asked")
        _nothing_good(values)
        for i, (tag, dv) in enumerate(zip(self.tags, values, strict=True)):
            code = _code(dv)
            if code & 0x80000000:
                table.bad(i, code, f"PLC reports {status_name(code)}", when)
                continue
            if code & 0x40000000:
                table.bad(i, code, f"PLC reports an uncertain value ({status_name(code)})", when)
                continue
            try:
                table.good(i, convert(tag.type, dv.Value), when)
            except ValueError as err:
                table.bad(i, S.BadTypeMismatch, f"type mismatch: {err}", when)

    async def probe(self, path: int) -> None:
        client = await self._client(path)
        self.requests += 1
        try:
            async with asyncio.timeout(self.timeout):
                [dv, *values] = await client.uaclient.read_attributes(
                    [_SERVER_STATE, *self.nodes], ua.AttributeIds.Value
                )
        except (*_FAILURES, ValueError) as err:
            raise await self._fail(path, client, err) from None
        if dv.Value is not None and dv.Value.Value not in (0, None):  # 0: Running
            raise PathError(f"server state {dv.Value.Value}, not running")
        _nothing_good(values)

    async def write(
        self, path: int, index: int, value: Value, may_send: Callable[[], bool]
    ) -> None:
        tag = self.tags[index]
        request = ua.WriteRequest()
        request.Parameters.NodesToWrite.append(
            ua.WriteValue(
                NodeId=self.nodes[index],
                AttributeId=ua.AttributeIds.Value,
                Value=ua.DataValue(ua.Variant(value, VARIANT[tag.type])),
            )
        )
        client = await self._client(path)
        protocol = client.uaclient.protocol
        if protocol is None:
            raise PathError("connection lost before the write was sent")
        # Nothing awaited from here until the request is in the socket.
        if not may_send():
            raise WriteError(S.BadInvalidState, "no longer the active node: write not sent")
        try:
            # Writes the request to the transport before it returns.
            answer = protocol._send_request(request, self.timeout)
        except _FAILURES:
            raise PathError("connection lost before the write was sent") from None
        self.requests += 1
        try:
            async with asyncio.timeout(self.timeout):
                data = await answer
            protocol.check_answer(data, "in response to WriteRequest")
            response = struct_from_binary(ua.WriteResponse, data)
            response.ResponseHeader.ServiceResult.check()
            [status] = response.Results
        except _FAILURES:
            await self._fail(path, client, TimeoutError())
            raise WriteError(
                S.BadTimeout,
                f"no reply within {self.timeout:g} s: the write may or may not have reached "
                "the PLC; it is not repeated",
            ) from None
        if not status.is_good():
            raise WriteError(status.value, f"PLC refused the write: {status_name(status.value)}")

    async def close(self) -> None:
        for i, client in enumerate(self.clients):
            self.clients[i] = None
            if client is not None:
                await _drop(client)


def _code(dv: Any) -> int:
    code: int = dv.StatusCode.value if dv.StatusCode is not None else 0
    return code


def _nothing_good(values: list[Any]) -> None:
    """PathError if not one value is good (bad or uncertain, every one of them)."""
    if values and all(_code(dv) & 0xC0000000 for dv in values):
        names = sorted({status_name(_code(dv)) for dv in values})
        raise PathError(
            f"every node bad: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        )


def _describe(err: BaseException, what: str) -> str:
    if isinstance(err, TimeoutError):
        return "no reply in time"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{what}: {text}"


async def _drop(client: Client) -> None:
    """Close a client that may be half connected or dead, in bounded time."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(0.5):
            await client.disconnect()
    with contextlib.suppress(Exception):
        client.disconnect_socket()


logging.getLogger("asyncua").setLevel(logging.ERROR)
