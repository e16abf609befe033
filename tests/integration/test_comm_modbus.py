"""The comm server against real Modbus TCP PLCs (pymodbus servers, one listener per path),
read by an independent asyncua client. The comm server runs alone (the active)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import pytest
from asyncua import ua
from pymodbus.constants import ExcCodes

from hapair.comm_server.codec import Value
from hapair.comm_server.driver import Driver, PathError, WriteError
from hapair.comm_server.modbus import ModbusDriver
from hapair.comm_server.role import FENCE_MARGIN_S
from hapair.shared.plcs import ModbusPlc as ModbusPlcConfig
from tests.support.cluster import until
from tests.support.harness import free_port
from tests.support.netns import CLONE_NEWNET
from tests.support.plc_sim import (
    CommUnderTest,
    ModbusPlc,
    noise,
    running_comm,
    short_reply,
    to_registers,
    wrong_function,
)

S = ua.StatusCodes


def config(*plcs: dict[str, Any]) -> str:
    return json.dumps({"plcs": list(plcs)})  # JSON is YAML


def plc(name: str, sim: ModbusPlc, tags: list[dict[str, Any]], **opts: Any) -> dict[str, Any]:
    return {
        "name": name,
        "paths": [{"host": h, "port": sim.port} for h in sim.hosts],
        "poll_interval_s": 0.2,
        "timeout_s": 0.1,
        "probe_interval_s": 0.2,
        **opts,
        "tags": tags,
    }


@pytest.fixture
async def sim() -> AsyncIterator[ModbusPlc]:
    """A PLC on two paths: 127.0.31.1 (primary) and 127.0.31.2 (backup)."""
    plc_ = await ModbusPlc(["127.0.31.1", "127.0.31.2"], free_port("127.0.31.1")).start()
    try:
        yield plc_
    finally:
        await plc_.stop()


async def good(comm: CommUnderTest, key: str, value: Any = None, timeout: float = 3.0) -> Any:
    async def check() -> Any:
        dv = await comm.read(key)
        if dv.StatusCode.is_good() and (value is None or dv.Value.Value == value):
            return dv
        return None

    return await until(
        check, timeout, f"{key} good" + (f" = {value!r}" if value is not None else "")
    )


async def status(comm: CommUnderTest, key: str, code: int, timeout: float = 3.0) -> Any:
    async def check() -> Any:
        dv = await comm.read(key)
        return dv if dv.StatusCode.value == code else None

    return await until(check, timeout, f"{key} status {ua.StatusCode(code).name}")


TYPED = [
    ("i16", "HR0", "int16", "big", -1234),
    ("u16", "HR1", "uint16", "big", 65000),
    ("i32", "HR2", "int32", "little", -123456789),
    ("u32", "HR4", "uint32", "big", 4000000000),
    ("f32", "HR6", "float32", "little", 21.5),
    ("f64", "HR8", "float64", "big", -1.0e100),
    ("i64", "HR12", "int64", "little", -(2**60)),
    ("u64", "HR16", "uint64", "big", 2**63 + 5),
    ("ir", "IR10", "uint32", "big", 70000),
]


async def test_every_type_area_and_word_order_served_with_quality_and_time(sim: ModbusPlc) -> None:
    for _, address, kind, order, value in TYPED:
        await sim.set_value(address[:2], int(address[2:]), value, kind, order)
    await sim.set("C", 5, [True])
    await sim.set("DI", 7, [True])
    tags = [{"name": n, "address": a, "type": k, "word_order": o} for n, a, k, o, _ in TYPED]
    tags += [
        {"name": "running", "address": "C5", "type": "bool"},
        {"name": "door", "address": "DI7", "type": "bool"},
        {"name": "temp", "address": "HR20", "type": "int16", "scale": 0.1, "offset": -40},
    ]
    await sim.set("HR", 20, [650])
    async with running_comm(config(plc("press-1", sim, tags))) as comm:
        before = datetime.now(UTC)
        for name, _, _, _, value in TYPED:
            dv = await good(comm, f"press-1.{name}")
            assert dv.Value.Value == value, name
            assert before.timestamp() - 5 < dv.SourceTimestamp.timestamp() <= time.time()
        assert (await good(comm, "press-1.running")).Value.Value is True
        assert (await good(comm, "press-1.door")).Value.Value is True
        temp = await good(comm, "press-1.temp")
        assert temp.Value.VariantType == ua.VariantType.Double
        assert temp.Value.Value == pytest.approx(25.0)
        f32 = await comm.read("press-1.f32")
        assert f32.Value.VariantType == ua.VariantType.Float
        # organised by PLC: Objects/press-1/<tags>, with the PLC's diagnostics beside them
        folder = await comm.client.nodes.objects.get_child([f"{comm.ns}:press-1"])
        names = {(await n.read_browse_name()).Name for n in await folder.get_children()}
        assert names == {t["name"] for t in tags} | {"_state", "_path"}
        # grouped: one request per area (HR0..HR20 with gaps of at most 16, IR, C, DI)
        driver = comm.server.pollers[0].driver
        assert [b.describe() for b in driver.blocks] == [
            "C5-C5",
            "DI7-DI7",
            "IR10-IR11",
            "HR0-HR20",
        ]
        before = sim.requests[0]
        await asyncio.sleep(1.0)  # five cycles of 4 requests (probes go to the backup)
        assert 4 * 4 <= sim.requests[0] - before <= 4 * 6


async def test_primary_cut_values_flow_through_the_backup_and_never_stale_as_good(
    sim: ModbusPlc,
) -> None:
    """A counter the PLC bumps every 20 ms: every value served as good must be one the
    PLC had within a poll interval + timeout of being served."""
    history: list[tuple[float, int]] = []
    running = True

    async def heartbeat() -> None:
        n = 0
        while running:
            n += 1
            history.append((time.time(), n))
            await sim.set("HR", 0, [n])
            await asyncio.sleep(0.02)

    notes: list[tuple[float, Any]] = []

    class Handler:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            notes.append((time.time(), data.monitored_item.Value))

    beat = asyncio.create_task(heartbeat())
    cfg = config(plc("press-1", sim, [{"name": "beat", "address": "HR0", "type": "uint16"}]))
    try:
        async with running_comm(cfg) as comm:
            await good(comm, "press-1.beat")
            sub = await comm.client.create_subscription(10, Handler())
            await sub.subscribe_data_change(comm.node("press-1.beat"))
            await asyncio.sleep(0.5)
            cut = time.time()
            n_at_cut = history[-1][1]
            await sim.stop_path(0)
            # a value the PLC set after the cut, read over the backup, within one interval
            await good(comm, "press-1.beat")
            moved = await until(
                lambda: _after(notes, cut, n_at_cut), 2.0, "a fresh good value after the cut"
            )
            # the next poll (within 0.2 s) finds the primary refused and reads the backup
            # within a poll or two, not after a reconnect timeout (figures: bench/bench_comm.py)
            assert moved - cut < 1.5, f"switch took {moved - cut:.3f} s"
            assert (await comm.read("press-1._path")).Value.Value == f"backup 127.0.31.2:{sim.port}"
            await asyncio.sleep(0.5)
            # both paths gone: stale at once (within interval + timeout), value kept
            gone = time.time()
            await sim.stop_path(1)
            dv = await status(comm, "press-1.beat", S.UncertainNoCommunicationLastUsableValue, 1.0)
            assert dv.Value.Value is not None

            async def stale_seen() -> float | None:
                marked = (
                    v.SourceTimestamp.timestamp()  # when the comm server marked it
                    for t, v in notes
                    if t > gone and not v.StatusCode.is_good()
                )
                return next(marked, None)

            stale_at = await until(stale_seen, 1.0, "the stale value notified")
            assert stale_at - gone < 1.5
            await asyncio.sleep(0.3)
            await sub.delete()
    finally:
        running = False
        await beat
    checked = 0
    for _, dv in notes:
        if dv.StatusCode.is_good():
            # when the server put it up as good (the client may have seen it later)
            served_at = dv.ServerTimestamp.timestamp()
            oldest_allowed = max(
                (n for t, n in history if t <= served_at - 0.2 - 0.1 - 0.05), default=0
            )
            assert dv.Value.Value >= oldest_allowed, f"stale {dv.Value.Value} served as good"
            checked += 1
    assert checked >= 5  # about one per poll, each checked
    # and after the last path went, nothing was put up as good any more
    assert not [
        dv
        for _, dv in notes
        if dv.StatusCode.is_good() and dv.ServerTimestamp.timestamp() > gone + 0.2 + 0.1 + 0.05
    ]


async def _after(notes: list[tuple[float, Any]], cut: float, n_at_cut: int) -> float | None:
    """When the comm server read the first value the PLC set after the cut."""
    for received, dv in notes:
        if received > cut and dv.StatusCode.is_good() and dv.Value.Value > n_at_cut + 2:
            read_at: float = dv.SourceTimestamp.timestamp()
            return read_at
    return None


async def test_back_on_the_primary_after_it_was_healthy_for_the_set_time(sim: ModbusPlc) -> None:
    cfg = config(
        plc(
            "press-1", sim, [{"name": "v", "address": "HR0", "type": "int16"}], failback_after_s=1.0
        )
    )
    async with running_comm(cfg) as comm:
        await good(comm, "press-1.v")
        # A first good value may come before the backup path has answered its probe.
        await until(lambda: _level_in(comm, 255, 255), 1.0, "ServiceLevel 255: both paths")
        await sim.stop_path(0)
        backup = f"backup 127.0.31.2:{sim.port}"

        async def on(path: str) -> bool:
            return bool((await comm.read("press-1._path")).Value.Value == path)

        await until(lambda: on(backup), 1.0, "the backup in use")
        # one path lost: degraded, still the active with data
        await until(lambda: _level_in(comm, 100, 198), 1.0, "a degraded ServiceLevel")
        state = (await comm.read("press-1._state")).Value.Value
        assert state.startswith(f"degraded: primary 127.0.31.1:{sim.port} down (connection refused")
        await sim.start_path(0)
        back = time.monotonic()
        await until(lambda: on(f"primary 127.0.31.1:{sim.port}"), 3.0, "the primary in use again")
        assert time.monotonic() - back >= 1.0 - 0.05
        await until(lambda: _level_in(comm, 255, 255), 1.0, "ServiceLevel 255 again")


async def _level_in(comm: CommUnderTest, low: int, high: int) -> bool:
    return low <= await comm.service_level() <= high


async def test_unreachable_turns_stale_then_bad_and_no_data_means_level_0(sim: ModbusPlc) -> None:
    cfg = config(
        plc("press-1", sim, [{"name": "v", "address": "HR0", "type": "int16"}], bad_after_s=0.6)
    )
    await sim.set("HR", 0, [7])
    async with running_comm(cfg) as comm:
        await good(comm, "press-1.v", 7)
        await sim.stop()
        await status(comm, "press-1.v", S.UncertainNoCommunicationLastUsableValue, 1.0)
        await until(lambda: _level_in(comm, 0, 0), 1.0, "ServiceLevel 0: no data")
        # Stale came first (above); bad follows within bad_after_s of the last good read,
        # which was before the cut: no lower bound can be drawn from the cut.
        dv = await status(comm, "press-1.v", S.BadNoCommunication, 3.0)
        assert dv.Value.Value is None
        state = (await comm.read("press-1._state")).Value.Value
        assert state.startswith(f"down: primary 127.0.31.1:{sim.port}: connection refused; backup")


async def test_a_write_reaches_the_plc_exactly_once(sim: ModbusPlc) -> None:
    tags = [
        {"name": "speed", "address": "HR100", "type": "float32", "writable": True},
        {"name": "limit", "address": "HR110", "type": "int16", "writable": True},
        {"name": "run", "address": "C5", "type": "bool", "writable": True},
        {"name": "count", "address": "HR120", "type": "uint32"},
    ]
    async with running_comm(config(plc("press-1", sim, tags))) as comm:
        await good(comm, "press-1.speed")
        ok = await comm.write("press-1.speed", 33.25, ua.VariantType.Float)
        assert ok.is_good()
        assert await comm.write("press-1.run", True, ua.VariantType.Boolean) == ua.StatusCode()
        assert [(w.area, w.address, w.values) for w in sim.writes] == [
            ("HR", 100, to_registers(33.25, "float32")),
            ("C", 5, [True]),
        ]
        await good(comm, "press-1.speed", 33.25)  # read back by the next poll
        # refused before anything is sent: nothing more reaches the PLC
        no = await comm.write("press-1.count", 1, ua.VariantType.UInt32)
        assert no.value == S.BadNotWritable
        no = await comm.write("press-1.limit", "fast", ua.VariantType.String)
        assert no.value == S.BadTypeMismatch
        no = await comm.write("press-1.limit", 40000, ua.VariantType.Int32)
        assert no.value == S.BadOutOfRange
        assert len(sim.writes) == 2
        # a write in the instant the primary is cut: sent into the dead connection, so no
        # answer: the client is told (BadTimeout), and the write is not repeated elsewhere
        await sim.stop_path(0)
        cut = await comm.write("press-1.limit", 7, ua.VariantType.Int16)
        assert cut.is_good() or cut.value == S.BadTimeout
        assert len(sim.writes) == 2 + cut.is_good()
        # once the cut is known, writes go over the backup, once each
        backup = f"backup 127.0.31.2:{sim.port}"
        await until(lambda: _path_is(comm, backup), 2.0, "the backup in use")
        assert (await comm.write("press-1.limit", -5, ua.VariantType.Int16)).is_good()
        assert [(w.area, w.address, w.values) for w in sim.writes[-1:]] == [("HR", 110, [65531])]
        assert len(sim.writes) == 3 + cut.is_good()


async def _path_is(comm: CommUnderTest, path: str) -> bool:
    return bool((await comm.read("press-1._path")).Value.Value == path)


async def test_garbage_marks_tags_bad_with_a_reason_and_never_stops_the_server(
    sim: ModbusPlc,
) -> None:
    clean = await ModbusPlc(["127.0.31.3"], free_port("127.0.31.3")).start()
    await clean.set("HR", 0, [42])
    tags = [
        {"name": "a", "address": "HR0", "type": "int16"},
        {"name": "b", "address": "HR1", "type": "int16"},
        {"name": "c", "address": "IR0", "type": "int16"},
        {"name": "far", "address": "HR40", "type": "float32"},
    ]
    cfg = config(
        plc("press-1", sim, tags, bad_after_s=0.4),
        plc("clean", clean, [{"name": "v", "address": "HR0", "type": "int16"}]),
    )
    try:
        async with running_comm(cfg) as comm:
            for key in ("press-1.a", "press-1.c", "press-1.far", "clean.v"):
                await good(comm, key)
            # an exception code for one request: its tags bad, the others untouched
            sim.exceptions[("HR", 1)] = ExcCodes.DEVICE_FAILURE
            await status(comm, "press-1.a", S.BadDeviceFailure)
            assert (await comm.read("press-1.b")).StatusCode.value == S.BadDeviceFailure
            assert (await comm.read("press-1.c")).StatusCode.is_good()
            state = (await comm.read("press-1._state")).Value.Value
            assert "2 tags bad (a, b): HR0-HR1: exception 4 (server device failure)" in state
            sim.exceptions.clear()
            await good(comm, "press-1.a")
            # replies of the wrong length, of the wrong function
            sim.garbage = short_reply
            dv = await status(comm, "press-1.a", S.BadDataEncodingInvalid)
            poller = comm.server.pollers[0]
            assert poller.table.tags[0].reason == "HR0-HR1: reply carries 1 registers, 2 were asked"
            sim.garbage = wrong_function
            await until(
                lambda: _reason(comm, "reply of function 4 to a request of function 3"),
                2.0,
                "the wrong function named",
            )
            # noise: no valid reply on either path, so the PLC is unreachable
            sim.garbage = noise
            dv = await status(comm, "press-1.a", S.BadNoCommunication, 3.0)
            assert dv.Value.Value is None
            assert "no reply within 0.1 s" in poller.table.tags[0].reason
            # the rest of the server never noticed
            assert (await comm.read("clean.v")).StatusCode.is_good()
            sim.garbage = None
            await good(comm, "press-1.a", timeout=3.0)
    finally:
        await clean.stop()


async def _reason(comm: CommUnderTest, text: str) -> bool:
    return text in comm.server.pollers[0].table.tags[0].reason


async def test_a_device_that_maps_no_gaps_is_read_in_contiguous_pieces(sim: ModbusPlc) -> None:
    """HR0 and HR5 share a request across HR1-HR4; the PLC refuses reads of unmapped
    addresses (exception 2): the comm server splits the request and reads on."""
    sim.exceptions[("HR", 3)] = ExcCodes.ILLEGAL_ADDRESS
    await sim.set("HR", 0, [1])
    await sim.set("HR", 5, [6])
    tags = [
        {"name": "a", "address": "HR0", "type": "int16"},
        {"name": "b", "address": "HR5", "type": "int16"},
    ]
    async with running_comm(config(plc("press-1", sim, tags))) as comm:
        assert (await good(comm, "press-1.a")).Value.Value == 1
        assert (await good(comm, "press-1.b")).Value.Value == 6
        driver = comm.server.pollers[0].driver
        assert [b.describe() for b in driver.blocks] == ["HR0-HR0", "HR5-HR5"]


async def test_a_path_answering_exception_4_to_every_request_is_a_failed_path(
    sim: ModbusPlc,
) -> None:
    """A gateway on the primary path lost the device: it answers exception 4 to every
    request. That path gives nothing: the backup is used; with both paths so, the PLC
    is unreachable and reported lost."""
    await sim.set("HR", 0, [7])
    await sim.set("IR", 0, [8])
    tags = [
        {"name": "a", "address": "HR0", "type": "int16"},
        {"name": "c", "address": "IR0", "type": "int16"},
    ]
    slow = {"poll_interval_s": 0.5, "timeout_s": 0.5}  # no timeout on a busy machine
    async with running_comm(config(plc("press-1", sim, tags, critical=True, **slow))) as comm:
        await good(comm, "press-1.a", 7)
        sim.failing_paths.add(0)
        backup = f"backup 127.0.31.2:{sim.port}"
        await until(lambda: _path_is(comm, backup), 2.0, "the backup in use")
        await until(lambda: _level_in(comm, 100, 198), 2.0, "a degraded ServiceLevel")
        assert (await good(comm, "press-1.c")).Value.Value == 8
        state = (await comm.read("press-1._state")).Value.Value
        assert state.startswith(f"degraded: primary 127.0.31.1:{sim.port} down ("), state
        assert "exception 4 (server device failure)" in state
        sim.failing_paths.add(1)
        await status(comm, "press-1.a", S.UncertainNoCommunicationLastUsableValue)
        await until(lambda: _level_in(comm, 0, 0), 2.0, "ServiceLevel 0: no data")
        resources, _ = comm.server._report_parts()
        assert not resources["plc:press-1"].ok


# -- a write left unacknowledged (the OPC UA PLC driver's case is in test_comm_opcua.py) ----
NFT_TABLE = "hapair_plc_blackhole"


def no_private_network() -> str | None:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        return "root, nft and ip are needed for a network namespace with a blackhole"
    return None


NO_PRIVATE_NETWORK = no_private_network()


def in_own_network(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on an event loop of its own, in a thread moved into a network
    namespace of its own (its loopback only): the test runner's other threads, and
    every socket of other tests, stay where they are. The namespace goes when its last
    socket closes."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
            asyncio.run(scenario())
        except BaseException as err:  # handed to the test's own thread
            failure.append(err)

    thread = threading.Thread(target=run, name="own network")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


async def nft(*script: str) -> None:
    """nftables of this thread's network namespace (a child inherits the thread's)."""
    proc = await asyncio.create_subprocess_exec(
        "nft", "-f", "-", stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await proc.communicate("\n".join(script).encode())
    assert proc.returncode == 0, err.decode()


async def connections_to(port: int) -> str:
    """This namespace's TCP connections to ``port`` in any state that can still send."""
    proc = await asyncio.create_subprocess_exec(
        "ss", "-tnH", "state", "connected", "dport", "=", f":{port}", stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return out.decode().strip()


async def blackholed_write(
    driver: Driver, port: int, value: Value, written: Callable[[], bool], live: Any, asks: int
) -> None:
    """Write tag 0 over path 0 to the PLC on ``port`` (its connection is open) while the
    path silently drops every packet to that port (nftables, in this namespace), until
    the fence margin has passed since the write was handed to the socket. The PLC must
    never see it (``written``): the connection gives the bytes up before the margin
    runs out, and nothing is retransmitted once the path is back. ``live`` is the
    connection's transport, whose socket must carry the bound; the driver asks whether it
    may send ``asks`` times, the last one as the bytes leave."""
    sock = live.get_extra_info("socket")
    bound = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert 0 < bound < FENCE_MARGIN_S * 1000, "the live socket's TCP_USER_TIMEOUT"
    asked: list[float] = []

    def may_send() -> bool:
        asked.append(time.monotonic())  # the last ask is as the bytes leave
        return True

    await nft(
        f"table inet {NFT_TABLE} {{",
        f"  chain input {{ type filter hook input priority 0; tcp dport {port} drop; }}",
        "}",
    )
    writing = asyncio.create_task(driver.write(0, 0, value, may_send))
    try:
        await until(lambda: asyncio.sleep(0, len(asked) == asks), 5, "the write sent")
        await asyncio.sleep(asked[-1] + FENCE_MARGIN_S - time.monotonic())
        await nft(f"delete table inet {NFT_TABLE}")
        restored = time.monotonic()

        async def delivered_or_given_up() -> bool:
            return written() or not await connections_to(port)

        await until(delivered_or_given_up, 20, "the write delivered or given up")
        assert not written(), (
            f"the PLC received the write {time.monotonic() - asked[-1]:.2f} s after it "
            f"was sent, {time.monotonic() - restored:.2f} s after the path came back"
        )
        with pytest.raises((WriteError, PathError)):
            async with asyncio.timeout(10):
                await writing
    finally:
        writing.cancel()
        with contextlib.suppress(BaseException):
            await writing


@pytest.mark.skipif(NO_PRIVATE_NETWORK is not None, reason=f"{NO_PRIVATE_NETWORK}")
def test_a_write_the_plc_has_not_acknowledged_within_the_fence_margin_never_reaches_it() -> None:
    """A write sent just before the fence point, on a path that loses every packet from
    then until the other node may be the active: the kernel must not deliver it late."""

    async def scenario() -> None:
        port = free_port()
        sim = await ModbusPlc(["127.0.0.1"], port).start()
        spec = plc("press-1", sim, [{"name": "setpoint", "address": "HR3", "type": "int16"}])
        # A request timeout far beyond the margin: the driver does not close the
        # connection itself before the path is back (a closed socket would retransmit
        # its unacknowledged bytes all the same).
        driver = ModbusDriver(
            ModbusPlcConfig.model_validate({**spec, "poll_interval_s": 10, "timeout_s": 5})
        )
        try:
            await driver.probe(0)  # connected, and the path works
            live = driver.clients[0].ctx.transport
            await blackholed_write(driver, port, 1234, lambda: bool(sim.writes), live, asks=2)
        finally:
            await driver.close()
            await sim.stop()

    in_own_network(scenario)
