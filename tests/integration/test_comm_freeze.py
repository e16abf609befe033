"""A comm server that stalls (SIGSTOP: a long GC pause, a starved VM, a debugger) must
not answer the requests that queued meanwhile with values it last confirmed before
the stall, as if they were fresh: freshness is judged when a client is answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client

from tests.support.cluster import until
from tests.support.harness import comm_process, free_port
from tests.support.plc_sim import ModbusPlc

HOST = "127.0.38.1"
PLC_HOST = "127.0.38.11"
INTERVAL, TIMEOUT = 0.2, 0.1  # a value is good for 0.3 s after the read that confirmed it
STALLS = 4


# hapair-comm runs on uvloop when it is installed, else on asyncio's own loop; the two
# order timers and socket events differently after a stall, so both are tried.
LOOPS = {
    "uvloop": "from hapair.comm_server.main import main",
    "asyncio": "import sys; sys.modules['uvloop'] = None; from hapair.comm_server.main import main",
}


@contextlib.contextmanager
def standalone_comm(
    tmp_path: Path, plc_port: int, port: int, loop: str
) -> Iterator[subprocess.Popen[bytes]]:
    config = tmp_path / "plcs.json"
    config.write_text(
        json.dumps(
            {
                "plcs": [
                    {
                        "name": "press-1",
                        "paths": [{"host": PLC_HOST, "port": plc_port}],
                        "poll_interval_s": INTERVAL,
                        "timeout_s": TIMEOUT,
                        "tags": [{"name": "count", "address": "HR0", "type": "uint16"}],
                    }
                ],
                "opcua": {"security": "none"},
            }
        )
    )
    run = f"{LOOPS[loop]}; raise SystemExit(main())"
    args = ["--standalone", "--config", str(config), "--listen", f"{HOST}:{port}"]
    with comm_process(tmp_path / "comm.log", args, run=run) as proc:
        yield proc


@pytest.mark.parametrize("loop", list(LOOPS))
async def test_a_read_queued_during_a_stall_is_not_answered_good_with_the_old_value(
    tmp_path: Path, loop: str
) -> None:
    plc = await ModbusPlc([PLC_HOST], free_port(PLC_HOST)).start()
    await plc.set("HR", 0, [1])
    port = free_port(HOST)
    url = f"opc.tcp://{HOST}:{port}/"
    try:
        with standalone_comm(tmp_path, plc.port, port, loop) as proc:

            async def connected() -> Any:
                client = Client(url, timeout=10)
                try:
                    await client.connect()
                except Exception:
                    return None
                return client

            client = await until(connected, 20, "the comm server serving")
            try:
                ns = await client.get_namespace_index("urn:hapair:comm")
                node = client.get_node(f"ns={ns};s=press-1.count")

                async def read() -> Any:
                    return await node.read_data_value(raise_on_bad_status=False)

                def good(value: int) -> Callable[[], Awaitable[Any]]:
                    async def check() -> Any:
                        dv = await read()
                        ok = dv.StatusCode.is_good() and dv.Value.Value == value
                        return dv if ok else None

                    return check

                # Which of the server's pending work runs first after the stall (the
                # queued read, the timer, the publication) varies: stall several times.
                for before in range(1, 1 + STALLS):
                    await until(good(before), 10, f"count good = {before}")
                    os.kill(proc.pid, signal.SIGSTOP)
                    try:
                        await plc.set("HR", 0, [before + 1])  # the PLC moves on meanwhile
                        queued = asyncio.create_task(read())
                        # Past the staleness bound (0.3 s) several times over: the fault.
                        await asyncio.sleep(1.0)
                        assert not queued.done()
                    finally:
                        os.kill(proc.pid, signal.SIGCONT)
                    dv = await asyncio.wait_for(queued, 10)
                    assert not (dv.StatusCode.is_good() and dv.Value.Value == before), (
                        f"stall {before}: answered Good with the value of before it: {dv}"
                    )
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()
    finally:
        await plc.stop()
