"""The comm server's Prometheus metrics: served over HTTPS to a client certificate of
the site CA only, in plain HTTP only when the lab mode is asked for by name, and
saying what its PLCs are doing."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from hapair.shared import pki
from tests.support.cluster import until
from tests.support.harness import PYTHON, ROOT, comm_process, free_port
from tests.support.metrics import Sample, samples, scrape, value
from tests.support.plc_sim import ModbusPlc

HOST = "127.0.39.1"
PLC_HOST = "127.0.39.11"


def config(tmp_path: Path, plc_port: int) -> Path:
    path = tmp_path / "plcs.json"
    plc = {
        "name": "press-1",
        "paths": [{"host": PLC_HOST, "port": plc_port}, {"host": PLC_HOST, "port": free_port()}],
        "poll_interval_s": 0.2,
        "tags": [
            {"name": "count", "address": "HR0", "type": "uint16"},
            {"name": "speed", "address": "HR1", "type": "uint16"},
        ],
    }
    path.write_text(json.dumps({"plcs": [plc], "opcua": {"security": "none"}}))
    return path


def comm(
    tmp_path: Path, plc_port: int, *metrics: str
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    args = ["--standalone", "--config", str(config(tmp_path, plc_port))]
    args += ["--listen", f"{HOST}:{free_port(HOST)}", *metrics]
    return comm_process(tmp_path / "comm.log", args)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init(directory, "metrics-test")
    pki.issue(directory, "metrics", "comm-a", ips=[HOST])
    pki.issue(directory, "prometheus", "prom")
    return directory


async def test_metrics_over_https_to_the_site_ca_only(tmp_path: Path, ca: Path) -> None:
    plc = await ModbusPlc([PLC_HOST], free_port(PLC_HOST)).start()
    port = free_port(HOST)
    files = pki.TlsFiles.issued(ca, "comm-a")
    flags = ["--metrics-listen", f"{HOST}:{port}", "--metrics-cert", str(files.cert)]
    flags += ["--metrics-key", str(files.key), "--metrics-ca", str(files.ca)]
    url = f"https://{HOST}:{port}/metrics"
    prometheus = pki.TlsFiles.issued(ca, "prom").client_context()
    try:
        with comm(tmp_path, plc.port, *flags):

            async def polled() -> dict[Sample, float] | None:
                try:
                    found = samples(await asyncio.to_thread(scrape, url, prometheus))
                except OSError:
                    return None
                good = value(found, "hapair_plc_tags", plc="press-1", quality="good")
                return found if good == 2.0 else None

            found = await until(polled, 20, "both tags good in the metrics")
            assert value(found, "hapair_plc_tags", plc="press-1", quality="bad") == 0.0
            assert value(found, "hapair_plc_reachable", plc="press-1") == 1.0
            assert value(found, "hapair_plc_path_up", plc="press-1", path="primary") == 1.0
            assert value(found, "hapair_plc_path_in_use", plc="press-1", path="primary") == 1.0
            assert value(found, "hapair_plc_path_in_use", plc="press-1", path="backup") == 0.0
            assert value(found, "hapair_comm_serving") == 1.0
            assert (value(found, "hapair_comm_poll_cycles_total") or 0) > 0
            assert (value(found, "hapair_comm_poll_lateness_seconds_count") or 0) > 0

            # No client certificate, or one of another CA: no metrics.
            bare = ssl.create_default_context(cafile=str(files.ca))
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                await asyncio.to_thread(scrape, url, bare)
            other = tmp_path / "other"
            pki.init(other, "someone-else")
            pki.issue(other, "prometheus", "prom")
            theirs = pki.TlsFiles.issued(other, "prom")
            stranger = pki.TlsFiles(files.ca, theirs.cert, theirs.key)
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                await asyncio.to_thread(scrape, url, stranger.client_context())
            # Only /metrics, only GET.
            with pytest.raises(urllib.error.HTTPError, match="404"):
                await asyncio.to_thread(scrape, f"https://{HOST}:{port}/", prometheus)
    finally:
        await plc.stop()


async def test_the_lab_mode_serves_plain_http_and_says_so(tmp_path: Path) -> None:
    plc = await ModbusPlc([PLC_HOST], free_port(PLC_HOST)).start()
    port = free_port(HOST)
    try:
        with comm(tmp_path, plc.port, "--metrics-listen", f"{HOST}:{port}", "--metrics-plain"):

            async def served() -> str | None:
                try:
                    return await asyncio.to_thread(scrape, f"http://{HOST}:{port}/metrics", None)
                except OSError:
                    return None

            assert "hapair_comm_serving" in await until(served, 20, "metrics in plain HTTP")
    finally:
        await plc.stop()
    assert "metrics served in the lab mode" in (tmp_path / "comm.log").read_text()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--metrics-listen", f"{HOST}:9"], "needs --metrics-cert, --metrics-key, --metrics-ca"),
        (["--metrics-listen", "nowhere"], "expected HOST:PORT"),
        (["--metrics-listen", f"{HOST}:9", "--metrics-plain", "--metrics-ca", "x"], "drop"),
    ],
)
def test_metrics_options_that_do_not_hold_are_refused(
    tmp_path: Path, flags: list[str], said: str
) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "hapair.comm_server.main", "--standalone",
         "--config", str(config(tmp_path, 1)), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2
    assert said in done.stderr
