"""What the registry shows Prometheus: the site as it sees it in etcd (which node of
each pair is active, each node's health, each endpoint's validity), and its own work
(lookups by answer, readers held, its touch with etcd). Read at each scrape."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from hapair.registry.appkeys import Readers, Served
from hapair.registry.cache import SiteCache
from hapair.shared import metrics


class RegistryCollector:
    """A prometheus_client collector over one registry's cache and counters."""

    def __init__(self, cache: SiteCache, readers: Readers, served: Served) -> None:
        self.cache = cache
        self.readers = readers
        self.served = served

    def collect(self) -> Iterator[Any]:
        yield from self._own()
        yield from self._site(self.cache.site())

    def _own(self) -> Iterator[Any]:
        lookups = metrics.counter(
            "hapair_registry_lookups", "endpoint lookups answered, by HTTP status", ["status"]
        )
        for status, count in sorted(self.served.lookups.items()):
            lookups.add_metric([str(status)], float(count))
        streams = metrics.gauge("hapair_registry_event_streams", "event streams open")
        streams.add_metric([], float(self.readers.streams))
        polls = metrics.gauge("hapair_registry_long_polls", "long-polls waiting")
        polls.add_metric([], float(self.readers.polls))
        synced = metrics.gauge(
            "hapair_registry_etcd_synced", "1 while the registry is in touch with etcd"
        )
        synced.add_metric([], 1.0 if self.cache.synced else 0.0)
        revision = metrics.gauge("hapair_registry_etcd_revision", "the etcd revision it has seen")
        revision.add_metric([], float(self.cache.view.revision))
        events = metrics.counter(
            "hapair_events",
            "events written to the audit trail since this registry started, by kind "
            "(fence, election, switchover_rejected, ...)",
            ["kind"],
        )
        for kind, count in sorted(self.cache.events_seen.items()):
            events.add_metric([kind], float(count))
        yield from (lookups, streams, polls, synced, revision, events)

    def _site(self, site: dict[str, Any]) -> Iterator[Any]:
        has_active = metrics.gauge(
            "hapair_pair_has_active", "1 when the pair has an active node", ["pair"]
        )
        active = metrics.gauge(
            "hapair_pair_active", "1 for the pair's active node", ["pair", "node"]
        )
        epoch = metrics.gauge("hapair_pair_epoch", "the active's term", ["pair"])
        paused = metrics.gauge("hapair_pair_paused", "1 while failover is paused", ["pair"])
        awaiting = metrics.gauge(
            "hapair_pair_awaiting_operator_seconds",
            "since when held services await an operator's acknowledgement (0: none)",
            ["pair"],
        )
        up = metrics.gauge("hapair_node_up", "1 when the node's agent publishes", ["pair", "node"])
        healthy = metrics.gauge(
            "hapair_node_healthy", "1 when the node reports itself healthy", ["pair", "node"]
        )
        standby = metrics.gauge(
            "hapair_node_standby_ready", "1 for a healthy, undrained standby", ["pair", "node"]
        )
        drained = metrics.gauge("hapair_node_drained", "1 while drained", ["pair", "node"])
        lag_bytes = metrics.gauge(
            "hapair_db_replication_lag_bytes", "a standby's replication lag", ["pair", "node"]
        )
        lag_s = metrics.gauge(
            "hapair_db_replication_lag_seconds", "a standby's replay lag", ["pair", "node"]
        )
        sync = metrics.gauge(
            "hapair_db_synchronous_standbys",
            "standbys the primary waits for (0: commits are not replicated synchronously)",
            ["pair", "node"],
        )
        endpoint = metrics.gauge(
            "hapair_endpoint_valid",
            "1 when the service has a valid endpoint to look up",
            ["pair", "service"],
        )
        now_wall = time.time()
        for workshop in site.get("workshops", []):
            for pair in workshop.get("pairs", []):
                name = pair["name"]
                has_active.add_metric([name], 1.0 if pair.get("active") else 0.0)
                epoch.add_metric([name], float(pair.get("epoch") or 0))
                paused.add_metric([name], 1.0 if pair.get("paused") else 0.0)
                recovery = pair.get("recovery") or {}
                waiting = recovery.get("state") == "awaiting" and recovery.get("held")
                since = max(0.0, now_wall - recovery["at"]) if waiting else 0.0
                awaiting.add_metric([name], since)
                for node in pair.get("nodes", []):
                    labels = [name, node["name"]]
                    active.add_metric(labels, 1.0 if pair.get("active") == node["name"] else 0.0)
                    up.add_metric(labels, 1.0 if node.get("up") else 0.0)
                    healthy.add_metric(labels, 1.0 if node.get("healthy") else 0.0)
                    ready = node.get("role") == "standby" and node.get("healthy")
                    standby.add_metric(labels, 1.0 if ready and not node.get("drained") else 0.0)
                    drained.add_metric(labels, 1.0 if node.get("drained") else 0.0)
                    db = node.get("database") or {}
                    if db.get("lag_bytes") is not None:
                        lag_bytes.add_metric(labels, float(db["lag_bytes"]))
                    if db.get("lag_s") is not None:
                        lag_s.add_metric(labels, float(db["lag_s"]))
                    if db.get("role") == "primary":
                        sync.add_metric(labels, float(len(db.get("synchronous") or [])))
                for found in pair.get("endpoints", []):
                    valid = 1.0 if found.get("status") == 200 else 0.0
                    endpoint.add_metric([name, found["service"]], valid)
        yield from (has_active, active, epoch, paused, awaiting, up, healthy, standby)
        yield from (drained, lag_bytes, lag_s, sync, endpoint)
