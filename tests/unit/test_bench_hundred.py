"""What bench_hundred reads: etcd's request counters, a daemon's counts, the agents' log
and the clients' record of a fan-out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench import etcd_rates
from bench.bench_hundred import published_at, requests_of, split, told_of

KV = 'grpc_service="etcdserverpb.KV",grpc_type="unary"'
LEASE = 'grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"'
METRICS = f"""\
# HELP grpc_server_handled_total Total number of RPCs completed on the server.
grpc_server_handled_total{{grpc_code="OK",grpc_method="Put",{KV}}} 12
grpc_server_handled_total{{grpc_code="Unavailable",grpc_method="Put",{KV}}} 3
grpc_server_handled_total{{grpc_code="OK",{LEASE}}} 2
grpc_server_msg_received_total{{{LEASE}}} 400
grpc_server_msg_received_total{{grpc_method="Put",{KV}}} 15
"""


def test_a_unary_call_counts_once_handled_and_a_stream_by_its_messages() -> None:
    assert requests_of(METRICS) == {"Put": 15.0, "LeaseKeepAlive": 400.0}


def test_a_daemons_rates_are_its_counts_over_the_time_between_two_reads(tmp_path: Path) -> None:
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"at": 10.0, "keepalive": 4, "watch": 3}))
    before = etcd_rates.read(path)
    path.write_text(json.dumps({"at": 20.0, "keepalive": 24, "watch": 3, "put": 5}))
    rates = etcd_rates.rates(before, etcd_rates.read(path))
    assert rates["keepalive"] == 2.0 and rates["put"] == 0.5 and rates["watch"] == 0.0
    assert set(rates) == set(etcd_rates.KINDS)


def test_the_publication_is_the_agents_line_for_that_service_and_epoch() -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time()))
    line = (
        f'ts={stamp}.250 level=info logger=hapair.agent event="endpoint published" '
        "node=p0-b pair=p0 epoch={epoch} endpoint={service}"
    )
    log = "\n".join(
        [
            line.format(epoch=7, service="svc-p0"),
            line.format(epoch=9, service="svc-p1"),
            line.format(epoch=9, service="svc-p0"),
        ]
    )
    at = published_at(log, "svc-p0", 9)
    assert at is not None and abs(at - time.monotonic()) < 2.0
    assert published_at(log, "svc-p0", 8) is None


def test_each_kind_of_client_is_told_apart(tmp_path: Path) -> None:
    out = tmp_path / "told.jsonl"
    assert told_of(out, 5) is None
    out.write_text(
        json.dumps({"epoch": 4, "told": [[1.0, 0]]})
        + "\n"
        + json.dumps({"epoch": 5, "told": [[10.1, 1], [10.2, 0], [10.3, 2]]})
        + "\n"
    )
    got = told_of(out, 5)
    assert got == [(10.1, 1), (10.2, 0), (10.3, 2)]
    assert split(got, 10.0) == "long-poll first 200 last 300, stream first 100 last 100"
