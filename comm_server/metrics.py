"""What the comm server shows Prometheus: its role, each PLC's paths and tag quality,
and how late polls start. Read from the server's state at each scrape."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hapair.comm_server.poller import LATE_BUCKETS_S
from hapair.comm_server.tags import Quality
from hapair.shared import metrics

if TYPE_CHECKING:
    from hapair.comm_server.app import CommServer


@dataclass
class Shown:
    """The comm server the metrics describe: a new PLC list starts a new one."""

    server: CommServer | None = None


class CommCollector:
    """A prometheus_client collector over the comm server of the moment."""

    def __init__(self, shown: Shown, pair: str, node: str) -> None:
        self.shown = shown
        self.base = {"pair": pair, "node": node}

    def collect(self) -> Iterator[Any]:
        s = self.shown.server
        if s is None:  # between two PLC lists
            return
        names = list(self.base)
        values = list(self.base.values())
        serving = metrics.gauge(
            "hapair_comm_serving", "1 when this comm server serves (accepts writes)", names
        )
        serving.add_metric(values, 1.0 if s.serving else 0.0)
        level = metrics.gauge(
            "hapair_comm_service_level", "the OPC UA ServiceLevel it announces", names
        )
        level.add_metric(values, float(s.level()) if s.role is not None else 0.0)
        yield from (serving, level)

        plc_labels = [*names, "plc"]
        reachable = metrics.gauge(
            "hapair_plc_reachable", "1 when the PLC answered its last poll", plc_labels
        )
        path_up = metrics.gauge(
            "hapair_plc_path_up",
            "1 up, 0 down, absent until tried: each network path to the PLC",
            [*plc_labels, "path"],
        )
        in_use = metrics.gauge(
            "hapair_plc_path_in_use", "1 for the path polls go over now", [*plc_labels, "path"]
        )
        tags = metrics.gauge(
            "hapair_plc_tags", "the PLC's tags by quality", [*plc_labels, "quality"]
        )
        for poller in s.pollers:
            plc = [*values, poller.plc.name]
            reachable.add_metric(plc, 1.0 if poller.reachable else 0.0)
            for i, path in enumerate(poller.switch.paths):
                role = "primary" if i == 0 else f"backup{i if i > 1 else ''}"
                if path.up is not None:
                    path_up.add_metric([*plc, role], 1.0 if path.up else 0.0)
                in_use.add_metric([*plc, role], 1.0 if i == poller.switch.current else 0.0)
            counts = poller.table.counts()
            for quality in Quality:
                tags.add_metric([*plc, quality.value], float(counts[quality.value]))
        yield from (reachable, path_up, in_use, tags)

        stats = s.stats
        cycles = metrics.counter("hapair_comm_poll_cycles", "poll cycles run", names)
        cycles.add_metric(values, float(stats.cycles))
        overruns = metrics.counter(
            "hapair_comm_poll_overruns", "poll slots skipped: a cycle outlasted its interval", names
        )
        overruns.add_metric(values, float(stats.overruns))
        yield from (cycles, overruns)
        from prometheus_client.core import HistogramMetricFamily

        late = HistogramMetricFamily(
            "hapair_comm_poll_lateness_seconds",
            "how long after its slot each poll cycle began",
            labels=names,
        )
        bounds = [*(f"{b:g}" for b in LATE_BUCKETS_S), "+Inf"]
        cumulative = list(itertools.accumulate(stats.late_counts))
        late.add_metric(
            values, list(zip(bounds, map(float, cumulative), strict=True)), stats.late_sum_s
        )
        yield late
