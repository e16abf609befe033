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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asyncua import Client
from cluster import until
from harness import PYTHON, ROOT, free_port, stop_pid
from plc_sim import ModbusPlc

HOST = "127.0.38.1"
PLC_HOST = "127.0.38.11"
INTERVAL, TIMEOUT = 0.2, 0.1  # a value is good for 0.3 s after the read that confirmed it


@contextlib.contextmanager
def standalone_comm(tmp_path: Path, plc_port: int, port: int) -> Iterator[subprocess.Popen[bytes]]:
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
                ]
            }
        )
    )
    log = (tmp_path / "comm.log").open("ab")
    command = ["-m", "comm_server.main", "--standalone", "--config", str(config)]
    proc = subprocess.Popen(
        [PYTHON, *command, "--listen", f"{HOST}:{port}"],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")},
            "PYTHONPATH": str(ROOT),
        },
    )
    log.close()
    try:
        yield proc
    finally:
        stop_pid(proc)


async def test_a_read_queued_during_a_stall_is_not_answered_good_with_the_old_value(
    tmp_path: Path,
) -> None:
    plc = await ModbusPlc([PLC_HOST], free_port(PLC_HOST)).start()
    await plc.set("HR", 0, [1])
    port = free_port(HOST)
    url = f"opc.tcp://{HOST}:{port}/"
    try:
        with standalone_comm(tmp_path, plc.port, port) as proc:

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

                async def good_1() -> Any:
                    dv = await read()
                    return dv if dv.StatusCode.is_good() and dv.Value.Value == 1 else None

                await until(good_1, 10, "count good = 1")
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    await plc.set("HR", 0, [2])  # the PLC moves on while the server stalls
                    queued = asyncio.create_task(read())
                    # Past the staleness bound (0.3 s) many times over: the fault itself.
                    await asyncio.sleep(1.5)
                    assert not queued.done()
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                dv = await asyncio.wait_for(queued, 10)
                assert not (dv.StatusCode.is_good() and dv.Value.Value == 1), (
                    f"answered Good with the value of before the stall: {dv}"
                )
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()
    finally:
        await plc.stop()
