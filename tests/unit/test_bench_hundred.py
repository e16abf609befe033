"""What bench_hundred reads: etcd's request counters, a daemon's counts, the agents' log
and the clients' record of a fan-out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench import etcd_rates
from bench.bench_hundred import (
    deployed_etcd_nice,
    published_at,
    requests_of,
    split,
    started_at,
    stop_s,
    told_of,
)

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


def test_a_service_fork_is_read_on_the_benchs_clock() -> None:
    boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    line = (
        'ts=2026-12-07T23:50:04.312 level=info logger=hapair.agent event="service started" '
        "node=p0-b pair=p0 epoch={epoch} service={service} pid=1 user=root at={at!r} "
        "cgroup=/sys/fs/cgroup/x"
    )
    log = "\n".join(
        [
            line.format(epoch=9, service="svc-p1", at=boot - 5),
            line.format(epoch=8, service="svc-p0", at=boot - 4),
            line.format(epoch=9, service="svc-p0", at=boot - 3),
        ]
    )
    at = started_at(log, "svc-p0", 9)
    assert at is not None and abs(at - (time.monotonic() - 3)) < 0.5
    assert started_at(log, "svc-p0", 10) is None


def test_a_step_downs_stop_is_the_last_one_logged() -> None:
    line = (
        'ts=2026-12-07T23:50:04.251 level=info logger=hapair.agent event="stepped down" '
        "node=p0-a pair=p0 epoch=284 reason=switchover to=p0-b outcome=done stop_ms={ms}"
    )
    assert stop_s("") is None
    assert (
        stop_s("\n".join([line.format(ms=211), 'event="became active"', line.format(ms=73)]))
        == 0.073
    )


def test_etcd_runs_at_the_nice_level_its_drop_in_gives_it() -> None:
    assert deployed_etcd_nice() < 0


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
