"""What an agent shows Prometheus: its role and term in its pair, its lease (keepalive
round trips, the time left to its fence point), fences, its services, its database
and its network view. Read from the agent's state at each scrape."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, get_args

from hapair.shared import metrics
from hapair.shared.records import ServiceState

if TYPE_CHECKING:
    from hapair.workshop_agent.agent import Agent


class AgentCollector:
    """A prometheus_client collector over one :class:`Agent`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        a = self.agent
        if a.pair is None or a.parts is None:
            return  # not in a pair (yet): nothing that a label could name
        p = a.parts
        names, values = ["pair", "node"], [a.pair.name, a.me]

        def one(name: str, doc: str, value: float) -> Any:
            family = metrics.gauge(name, doc, names)
            family.add_metric(values, value)
            return family

        now = a.clock()
        point = p.fencing.point()
        yield one(
            "hapair_agent_active", "1 while this node holds its pair's term", a.term is not None
        )
        yield one("hapair_agent_epoch", "the term it holds (0: none)", float(a.term or 0))
        yield one(
            "hapair_agent_lease_held", "1 while its etcd lease is confirmed", p.fencing.valid(now)
        )
        yield one(
            "hapair_agent_fence_margin_seconds",
            "time left before it must have stopped acting if no keepalive is answered "
            "(0 without a lease)",
            max(0.0, point - now) if math.isfinite(point) else 0.0,
        )
        fences = metrics.counter(
            "hapair_agent_fences", "times it stopped its services at its fence point", names
        )
        fences.add_metric(values, float(p.fencing.fences))
        firings = metrics.counter(
            "hapair_agent_watchdog_firings",
            "times its watchdog killed the active's services at a deadline this agent had "
            "not extended (frozen or hung), counted once the agent runs again",
            names,
        )
        if a.watchdog is not None:
            a.watchdog.read_reports()
        firings.add_metric(values, float(a.watchdog.firings if a.watchdog else 0))
        trips = metrics.histogram(
            "hapair_agent_keepalive_seconds",
            "from sending each lease keepalive (or grant) to etcd's answer",
            names,
        )
        rt = p.session.round_trips
        trips.add_metric(values, rt.cumulative(), rt.total)
        beats = metrics.counter(
            "hapair_agent_term_beats",
            "term beats it sent as the active of a pair with failover.term_beat",
            names,
        )
        beats.add_metric(values, float(p.beating.beats_sent))
        refused = metrics.counter(
            "hapair_agent_term_beats_refused",
            "term beats etcd refused (its term had ended there): each one fenced it",
            names,
        )
        refused.add_metric(values, float(p.beating.beats_refused))
        yield from (fences, firings, trips, beats, refused)
        yield one(
            "hapair_agent_fence_loop",
            "1 while it fences itself in a loop (three fences for lateness within ten "
            "minutes): its status says which setting fits",
            p.fence_loop.looping,
        )
        state = a.state
        yield one(
            "hapair_agent_paused",
            "1 while its pair's failover is paused",
            bool(state and state.paused),
        )
        yield one(
            "hapair_agent_drained",
            "1 while this node is drained",
            bool(state and a.me in state.drained),
        )
        yield one(
            "hapair_agent_awaiting_operator",
            "1 while held services await an operator's acknowledgement",
            bool(p.supervisor.held),
        )
        netwatch = a.netwatch.state
        yield one(
            "hapair_agent_network_problems",
            "problems its network probes see now (peer path, probe targets)",
            float(len(netwatch.problems())) if netwatch is not None else 0.0,
        )
        yield from self._services(names, values)
        yield from self._database(names, values)

    def _services(self, names: list[str], values: list[str]) -> Iterator[Any]:
        p = self.agent.parts
        assert p is not None
        state = metrics.gauge(
            "hapair_service_state",
            "1 for the state each service of this node is in",
            [*names, "service", "state"],
        )
        restarts = metrics.counter(
            "hapair_service_restarts", "restarts in place of each service", [*names, "service"]
        )
        for s in p.supervisor.statuses():
            for known in get_args(ServiceState):
                state.add_metric([*values, s.name, known], 1.0 if s.state == known else 0.0)
            restarts.add_metric([*values, s.name], float(s.restarts))
        yield from (state, restarts)

    def _database(self, names: list[str], values: list[str]) -> Iterator[Any]:
        p = self.agent.parts
        assert p is not None
        status = p.database.status if p.database is not None else None
        if status is None:
            return
        primary = metrics.gauge(
            "hapair_agent_db_primary", "1 while its PostgreSQL is the primary", names
        )
        primary.add_metric(values, 1.0 if status.role == "primary" else 0.0)
        yield primary
