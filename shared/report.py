"""The shape of ``GET /v1/site``: the whole site state, as operators see it.

Both the registry (which serves it) and the CLI (which renders it, or builds it
straight from etcd) use these models, so a registry answer is validated like any
other input before it is shown.
"""

from __future__ import annotations

from typing import Any

from hapair.shared.model import LenientModel
from hapair.shared.plcs import PathHealth


class Note(LenientModel):
    """Who set a flag (pause, drain), when and why."""

    by: str
    at: float
    reason: str = ""


class PendingSwitchover(LenientModel):
    id: str
    to: str | None = None
    by: str
    at: float
    reason: str = ""


class ContextReport(LenientModel):
    """Where a held service's process would resume (its committed process context);
    ``step`` None with no ``error``: it never committed a step."""

    process: str
    database: str | None = None
    step: int | None = None
    state: dict[str, Any] = {}
    last_step: int | None = None
    last_result: dict[str, Any] | None = None
    epoch: int | None = None
    steps_committed: int = 0
    committed_at: float | None = None
    error: str | None = None


class RecoveryReport(LenientModel):
    """A recovery after an unplanned failover: held services await an operator's ack."""

    epoch: int
    cause: str
    from_node: str | None = None
    to_node: str
    held: list[str] = []
    state: str
    at: float
    acked_by: str | None = None
    acked_at: float | None = None
    contexts: dict[str, ContextReport] | None = None
    """Per held service, once the active has read them from its database."""


class ServiceReport(LenientModel):
    name: str
    state: str
    restarts: int = 0
    placement: str = "active"
    detail: str | None = None


class PackageReport(LenientModel):
    """A service's package on one node: the version the site names, whether the node
    holds it, the versions it holds and the one its process runs."""

    service: str
    declared: str
    """The version the site file names."""
    state: str
    """``installed``, ``installing``, ``failed`` or ``not reported``."""
    detail: str | None = None
    """Why it is not installed (the last attempt's failure)."""
    held: list[str] = []
    """The versions the node holds, newest first (``{version}-{sha256[:12]}``)."""
    running: str | None = None
    """The version its process runs, when it runs and says so."""


class DatabaseReport(LenientModel):
    """What a node's PostgreSQL reports: role, timeline, lag, sync state of its replicas."""

    role: str
    timeline: int | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None
    streaming: bool = False
    synchronous: list[str] = []


class NodeReport(LenientModel):
    name: str
    address: str
    up: bool
    role: str
    healthy: bool | None = None
    problems: list[str] = []
    services: list[ServiceReport] = []
    drained: Note | None = None
    epoch: int | None = None
    updated: float | None = None
    database: DatabaseReport | None = None
    packages: list[PackageReport] = []
    drift: list[str] = []
    """The services whose declared package version the node does not hold (the alarm
    ``package drift``): it becomes active only if no node holding them can."""


class EndpointReport(LenientModel):
    """A service's lookup answer: ``status`` 200 with the address, or the reason why not."""

    service: str
    status: int
    node: str | None = None
    host: str | None = None
    port: int | None = None
    protocol: str | None = None
    epoch: int | None = None
    error: str | None = None


class PlcReport(LenientModel):
    """One PLC as one node's comm server reports it (``node`` None: a PLC of the pair's
    topology that no comm server reports). ``path`` is the index in ``paths`` of the
    path in use, 0 being the primary."""

    name: str
    node: str | None = None
    service: str | None = None
    state: str
    path: int = 0
    paths: list[PathHealth] = []
    critical: bool = False
    problem: str | None = None
    tags: dict[str, int] = {}


class PairReport(LenientModel):
    name: str
    active: str | None = None
    epoch: int | None = None
    since: float | None = None
    paused: Note | None = None
    switchover: PendingSwitchover | None = None
    recovery: RecoveryReport | None = None
    nodes: list[NodeReport] = []
    endpoints: list[EndpointReport] = []
    plcs: list[PlcReport] = []
    """PLC by PLC, each as every reporting node sees it (nodes in the pair's order)."""


class WorkshopReport(LenientModel):
    name: str
    pairs: list[PairReport] = []


class EventReport(LenientModel):
    kind: str
    at: float
    pair: str | None = None
    node: str | None = None
    epoch: int | None = None
    reason: str = ""
    details: dict[str, Any] = {}


class ProblemReport(LenientModel):
    key: str
    problem: str


class TopologyInfo(LenientModel):
    site: str
    applied_by: str
    applied_at: float


class SiteReport(LenientModel):
    site: str | None = None
    revision: int = 0
    warning: str | None = None
    """Set by a registry that has lost etcd and shows the state last seen."""
    topology: TopologyInfo | None = None
    workshops: list[WorkshopReport] = []
    events: list[EventReport] = []
    problems: list[ProblemReport] = []
