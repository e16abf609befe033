"""Modbus TCP PLCs through pymodbus: grouped reads, checked replies, single writes.

Every reply is checked before a value is taken from it: an exception reply marks the
request's tags bad with the exception's name; a reply of the wrong function code or
length marks them bad as garbage. A missing or undecodable reply is a path failure,
and so is a poll in which every request was answered with an exception (a gateway
that lost the device, a device that fails whatever is asked): the path gives no data,
and the other path may well give some. Nothing is stored until the poll's every
request has been answered, so a path that fails leaves the tags as they were. A
request that timed out closes its connection, so a late answer can never be taken for
the reply to the next request.

A write asks whether it may still be sent in the instant its bytes leave (pymodbus's
``trace_pdu`` hook, called just before the request is written to the socket), not
before it queues for the connection: pymodbus sends one request at a time per
connection, so a write can wait behind a poll read for up to the timeout, and the node
may lose the active role meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from hapair.comm_server.codec import (
    Block,
    EncodeError,
    Value,
    encode_registers,
    plan_reads,
    register_decoder,
    registers_bytes,
    split_block,
)
from hapair.comm_server.driver import Driver, PathError, WriteError, bound_unacked
from hapair.comm_server.tags import TagTable
from hapair.comm_server.uatypes import S
from hapair.shared.plcs import ModbusPlc

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we log path changes ourselves

EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
# A gateway that cannot reach the device says nothing about the device's data: for us
# that path is down, and the other path may well get through.
PATH_EXCEPTIONS = {10, 11}
# Exceptions about the request rather than the device: a probe answered so still
# shows a working path.
REQUEST_EXCEPTIONS = {1, 2, 3}
_READ_FC = {"C": 1, "DI": 2, "HR": 3, "IR": 4}


# The write being sent by the current task, if any: its last check before the bytes
# leave. A context variable, so that poll reads (other tasks) never see it.
_send_gate: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "modbus_send_gate", default=None
)


def _gate(sending: bool, pdu: Any) -> Any:
    """pymodbus's ``trace_pdu``: runs synchronously right before a request is written
    to the socket; raising here means nothing is sent."""
    may_send = _send_gate.get()
    if sending and may_send is not None and not may_send():
        raise WriteError(S.BadInvalidState, "no longer the active node: write not sent")
    return pdu


def exception_text(code: object) -> str:
    name = EXCEPTIONS.get(code, "unknown") if isinstance(code, int) else "unknown"
    return f"exception {code} ({name})"


class ModbusDriver(Driver):
    def __init__(self, plc: ModbusPlc) -> None:
        self.plc = plc
        self.tags = plc.tags
        self.endpoints = [str(p) for p in plc.paths]
        self.timeout = plc.timeout
        self.blocks = plan_reads(plc.tags, plc.max_gap, plc.max_registers, plc.max_bits)
        self.decoders = [register_decoder(t) if t.area in ("IR", "HR") else None for t in plc.tags]
        self.clients = [
            AsyncModbusTcpClient(
                p.host,
                port=p.port,
                timeout=self.timeout,
                retries=0,
                reconnect_delay=0,  # we reconnect, on our schedule
                name=f"{plc.name}:{i}",
                trace_pdu=_gate,
                trace_connect=functools.partial(self._connected, i),
            )
            for i, p in enumerate(plc.paths)
        ]
        self.requests = 0
        # A poll and a probe may want the same path at once: one connect, not two.
        self._connecting = [asyncio.Lock() for _ in plc.paths]

    async def _client(self, path: int) -> AsyncModbusTcpClient:
        client = self.clients[path]
        if client.connected:
            return client
        async with self._connecting[path]:
            if not client.connected:
                await self._connect(client)
        return client

    def _connected(self, path: int, up: bool) -> None:
        """pymodbus's ``trace_connect``, called as the connection is made, before any
        request can use it: bound its unacknowledged bytes (see ``hapair.comm_server.driver``);
        a connection that cannot be bounded is dropped unused."""
        transport = self.clients[path].ctx.transport
        if not up:
            return
        try:
            bound_unacked(transport)
        except OSError:
            if transport is not None:  # closed at once: a write to it is dropped
                transport.close()

    async def _connect(self, client: AsyncModbusTcpClient) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout + 0.1):
                ok = await client.connect()
        except TimeoutError:
            ok = False
        if not ok:
            client.close()
            took = time.monotonic() - started
            raise PathError(
                f"no connection within {self.timeout:g} s"
                if took >= self.timeout
                else "connection refused"
            )

    async def _request(self, client: AsyncModbusTcpClient, call: Callable[[], Any]) -> Any:
        self.requests += 1
        try:
            # pymodbus raises ConnectionException from the call itself when not connected.
            async with asyncio.timeout(self.timeout + 0.1):
                return await call()
        except ConnectionException:
            raise PathError("connection lost") from None
        except (ModbusException, TimeoutError, OSError) as err:
            # Closing drops whatever arrives late: it must not pass for the next reply.
            was_open = client.connected
            client.close()
            if not was_open:
                raise PathError("connection lost") from None
            if isinstance(err, TimeoutError) or "No response" in str(err):
                raise PathError(f"no reply within {self.timeout:g} s") from None
            raise PathError(f"bad reply: {err}") from None

    def _read_call(self, client: AsyncModbusTcpClient, block: Block) -> Callable[[], Any]:
        read = {
            "C": client.read_coils,
            "DI": client.read_discrete_inputs,
            "IR": client.read_input_registers,
            "HR": client.read_holding_registers,
        }[block.area]
        return lambda: read(block.start, count=block.count, device_id=self.plc.unit)

    async def read(self, path: int, table: TagTable, when: float) -> None:
        client = await self._client(path)
        todo = list(self.blocks)
        answered: list[tuple[Block, Any]] = []
        refused: list[tuple[Block, str]] = []
        while todo:
            block = todo.pop(0)
            reply = await self._request(client, self._read_call(client, block))
            if reply.isError():
                code = getattr(reply, "exception_code", None)
                if code in PATH_EXCEPTIONS:
                    raise PathError(exception_text(code))
                if code == 2 and block.spans_gaps:
                    pieces = split_block(block, self.tags)
                    self._replace(block, pieces)
                    todo[:0] = pieces
                    continue
                refused.append((block, exception_text(code)))
                continue
            answered.append((block, reply))
        if not answered and refused:
            raise PathError(
                "every request answered " + " or ".join(sorted({why for _, why in refused}))
            )
        for block, why in refused:
            table.bad_all(block.tags, S.BadDeviceFailure, f"{block.describe()}: {why}", when)
        for block, reply in answered:
            self._take(block, reply, table, when)

    def _replace(self, block: Block, pieces: list[Block]) -> None:
        """From now on read ``block`` in contiguous pieces (the device maps no gaps)."""
        at = self.blocks.index(block)
        self.blocks[at : at + 1] = pieces

    def _take(self, block: Block, reply: Any, table: TagTable, when: float) -> None:
        fc = _READ_FC[block.area]
        if getattr(reply, "function_code", None) != fc:
            table.bad_all(
                block.tags,
                S.BadDataEncodingInvalid,
                f"{block.describe()}: reply of function {reply.function_code} "
                f"to a request of function {fc}",
                when,
            )
            return
        if block.area in ("C", "DI"):
            bits = reply.bits
            # Bits come packed in whole bytes: up to 7 padding bits, never fewer than asked.
            if not block.count <= len(bits) < block.count + 8:
                self._wrong_length(block, f"{len(bits)} bits", table, when)
                return
            for i in block.tags:
                table.good(i, bool(bits[self.tags[i].index - block.start]), when)
            return
        registers = reply.registers
        if len(registers) != block.count:
            self._wrong_length(block, f"{len(registers)} registers", table, when)
            return
        buf = registers_bytes(registers)
        for i in block.tags:
            decode = self.decoders[i]
            assert decode is not None
            try:
                table.good(i, decode(buf, self.tags[i].index - block.start), when)
            except (struct.error, ValueError, OverflowError) as err:  # defensive: never crash
                table.bad(i, S.BadDataEncodingInvalid, f"cannot decode: {err}", when)

    @staticmethod
    def _wrong_length(block: Block, got: str, table: TagTable, when: float) -> None:
        table.bad_all(
            block.tags,
            S.BadDataEncodingInvalid,
            f"{block.describe()}: reply carries {got}, {block.count} were asked",
            when,
        )

    async def probe(self, path: int) -> None:
        client = await self._client(path)
        first = self.blocks[0]
        probe = Block(first.area, first.start, 1, (), False)
        reply = await self._request(client, self._read_call(client, probe))
        code = getattr(reply, "exception_code", None) if reply.isError() else None
        if code is not None and code not in REQUEST_EXCEPTIONS:  # the device failed
            raise PathError(exception_text(code))

    async def write(
        self, path: int, index: int, value: Value, may_send: Callable[[], bool]
    ) -> None:
        tag, unit = self.tags[index], self.plc.unit
        if tag.area == "C":
            if not isinstance(value, bool):
                raise WriteError(S.BadTypeMismatch, f"{tag.name} is a coil: write true or false")
            registers: list[int] = []
        else:
            try:
                registers = encode_registers(tag, value)
            except EncodeError as err:
                raise WriteError(S.BadOutOfRange, str(err)) from None
        client = await self._client(path)
        if not may_send():  # no need to queue for the connection
            raise WriteError(S.BadInvalidState, "no longer the active node: write not sent")
        self.requests += 1
        gate = _send_gate.set(may_send)  # asked again as the bytes leave: see _gate
        try:
            if tag.area == "C":
                call = client.write_coil(tag.index, bool(value), device_id=unit)
            elif len(registers) == 1:
                call = client.write_register(tag.index, registers[0], device_id=unit)
            else:
                call = client.write_registers(tag.index, registers, device_id=unit)
            async with asyncio.timeout(self.timeout + 0.1):
                reply = await call
        except ConnectionException:
            raise PathError("connection lost before the write was sent") from None
        except (ModbusException, TimeoutError, OSError):
            client.close()
            raise WriteError(
                S.BadTimeout,
                f"no reply within {self.timeout:g} s: the write may or may not have reached "
                "the PLC; it is not repeated",
            ) from None
        finally:
            _send_gate.reset(gate)
        if reply.isError():
            raise WriteError(
                S.BadDeviceFailure, f"PLC refused the write: {exception_text(reply.exception_code)}"
            )

    async def close(self) -> None:
        for client in self.clients:
            client.close()
