"""Values stored in etcd, one frozen model per key kind.

Everything read back from etcd goes through :func:`decode`, which names the key and
the field when a value is garbage; the reader then logs it and treats the key as
absent instead of acting on it.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any, Literal, TypeVar, cast

from pydantic import Field, ValidationError

from hapair.shared.model import LenientModel
from hapair.shared.topology import Name, format_errors

Role = Literal["active", "standby", "starting", "stopping", "fenced", "idle"]
ServiceState = Literal[
    "stopped", "starting", "running", "unhealthy", "restarting", "failed", "held"
]


class RecordError(ValueError):
    def __init__(self, key: str, problems: list[str]) -> None:
        self.key = key
        self.problems = problems
        super().__init__(f"invalid value at {key}: " + "; ".join(problems))


class Record(LenientModel):
    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def now_wall() -> float:
    return time.time()


@functools.cache
def local_boot_id() -> str | None:
    """This machine's boot id: differs between machines and across reboots."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


class Leader(Record):
    """``/pairs/{pair}/leader``. The epoch is the key's create_revision, not a field."""

    node: Name
    since: float = Field(default_factory=now_wall)


class EndpointRecord(Record):
    """``/endpoints/{service}``: where the active of ``epoch`` serves ``service``, bound
    to its lease (the site file's declaration is :class:`hapair.shared.topology.EndpointSpec`,
    a client's view :class:`hapair.shared.client.Endpoint`)."""

    service: str
    pair: Name
    node: Name
    host: str
    port: int = Field(ge=1, le=65535)
    protocol: str
    epoch: int = Field(ge=1)


class ServiceStatus(Record):
    name: Name
    placement: Literal["active", "all"]
    state: ServiceState
    restarts: int = 0
    pid: int | None = None
    detail: str | None = None
    package: str | None = None
    """The package version its process runs (``{version}-{sha256[:12]}``), when it
    comes from a ``package:`` and runs."""


PackageState = Literal["installing", "installed", "failed"]


class PackageStatus(Record):
    """What this node holds of a service's ``package:``: the version the site names,
    whether it is installed here, what else is on disk, and why it is not when it failed."""

    service: Name
    version: str
    """The version the site file names."""
    state: PackageState
    installed: list[str] = Field(default_factory=list)
    """The versions this node holds, newest first (``{version}-{sha256[:12]}``)."""
    detail: str | None = None
    """Why the named version is not installed (the last attempt's failure)."""


class NodeStatus(Record):
    node: Name
    pair: Name
    address: str
    role: Role
    epoch: int | None = None
    healthy: bool = True
    problems: list[str] = Field(default_factory=list)
    services: list[ServiceStatus] = Field(default_factory=list)
    packages: list[PackageStatus] = Field(default_factory=list)
    database: dict[str, Any] | None = None
    pid: int = 0
    boot_id: str | None = None
    """The agent's machine and boot (``/proc/sys/kernel/random/boot_id``): with ``pid``,
    tells a tool on a machine whether that agent runs there (``hapair drill``)."""
    pid_ns: int | None = None
    """The inode of the agent's PID namespace: ``pid`` names it only there (containers
    of one machine share its boot id but not their PIDs). None in older statuses."""
    pid_start: int | None = None
    """The agent's start time, in clock ticks after boot: a PID reused after it is not
    the agent's."""
    held_by: str | None = None
    """The node this one promised, over the peer path, not to campaign against: an
    active that holds the pair while it cannot reach etcd."""
    updated: float = Field(default_factory=now_wall)


class Resource(Record):
    """One resource a service needs, as the service sees it from its node."""

    ok: bool
    critical: bool = False
    grace_s: float = Field(5.0, ge=0.0, description="lost this long on the active: move")
    detail: str = ""


class ResourceReport(Record):
    """What a service reports of the resources it needs (PLCs, database):
    ``/nodes/{node}/reports/{service}``, bound to the reporting service's own lease.

    This is how an application forces a switch: a critical resource lost on the active
    while a standby still reaches it moves the pair to that standby."""

    service: Name
    resources: dict[str, Resource] = Field(default_factory=dict)
    at: float = Field(default_factory=now_wall)


class Paused(Record):
    by: str
    at: float = Field(default_factory=now_wall)
    reason: str = ""


class Drained(Record):
    by: str
    at: float = Field(default_factory=now_wall)
    reason: str = ""


class Switchover(Record):
    """An operator's request, written by the CLI or the registry, read by the active."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    to: Name | None = None
    by: str = "operator"
    at: float = Field(default_factory=now_wall)
    reason: str = ""


class Takeover(Record):
    """``/pairs/{pair}/commands/takeover``: an operator forces ``to`` to take a pair that
    has no active node, accepting that it may lack acknowledged commits. Written on a
    short lease (it lapses unused), deleted by whichever node wins the next election."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    to: Name
    by: str = "operator"
    at: float = Field(default_factory=now_wall)
    reason: str = ""


class RestartRequest(Record):
    """``/pairs/{pair}/commands/restart/{node}``: a rollout asks ``node`` to run its
    copies of ``versions``' services on those package versions (``{version}-{sha12}``)
    from now on, and to restart the ``placement: all`` ones in ``restart`` that run
    another. Judged in the pair's term ``epoch``: a node sees it stale once the pair has
    another leader. Written on a short lease, so one never taken up lapses."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    rollout: str
    node: Name
    epoch: int = Field(ge=1)
    versions: dict[str, str] = Field(default_factory=dict)
    restart: list[str] = Field(default_factory=list)
    by: str = "operator"
    at: float = Field(default_factory=now_wall)


class RolloutLock(Record):
    """``/pairs/{pair}/commands/rollout``: the rollout under way, on its orchestrator's
    lease (gone with it)."""

    id: str
    by: str
    at: float = Field(default_factory=now_wall)


class HandoverRecord(Record):
    """Written by the active as it steps down: only ``to`` may campaign for a while."""

    from_node: Name
    to: Name
    epoch: int
    request: str | None = None
    planned: bool = True
    lsn: int | None = None  # the old primary's shutdown checkpoint: the target waits for it
    at: float = Field(default_factory=now_wall)


class TermBeatRecord(Record):
    """``/hapair/beats/v1/{pair}``: the active's term beat, written every ``interval_ms``
    while the leader key has its epoch. Its mod revision is what a standby's takeover
    compares; the value, the same all term long, carries the term's timings, so that a
    standby waits the writer's, not those of its own (possibly older) site file."""

    node: Name
    interval_ms: int = Field(gt=0)
    fence_ms: int = Field(gt=0)
    margin_ms: int = Field(gt=0)


class Members(Record):
    """``/pairs/{pair}/members``: the nodes of the pair its active acknowledged, written
    with the leader key by the campaign that won (``epoch`` None: the key's mod revision
    is that epoch) and again by the active, guarded by its ``epoch``, when its topology
    lists other nodes. A node not listed does not campaign: the active, if cut off from
    etcd, holds the pair on the promises of these nodes only."""

    nodes: list[Name]
    epoch: int | None = None
    at: float = Field(default_factory=now_wall)


class SyncState(Record):
    """``/pairs/{pair}/sync_standby``, written by the primary (guarded by its epoch).

    ``primary`` holds every acknowledged commit, and so does the one node in ``sync``;
    with several (quorum commit, ``ANY 1``) each commit is on one of them at least, so
    only the one that received the most holds them all. No node outside the record may
    take over automatically. Empty ``sync`` with ``degraded``: the primary went
    asynchronous because its synchronous standby was gone."""

    primary: Name
    sync: list[str] = Field(default_factory=list)
    degraded: bool = False
    epoch: int = 0
    at: float = Field(default_factory=now_wall)

    def holds_everything(self, node: str) -> bool:
        """Whether ``node`` may hold every commit (under quorum, see above: compare)."""
        return node == self.primary or node in self.sync


class HeldContext(Record):
    """Where a held service's process would resume: its committed context
    (``hapair.shared.process_context``) as the new active read it from its own primary.
    ``step`` None with no ``error``: the process never committed a step."""

    process: str
    database: str | None = None
    step: int | None = None
    """The next step to run."""
    state: dict[str, Any] = Field(default_factory=dict)
    last_step: int | None = None
    last_result: dict[str, Any] | None = None
    epoch: int | None = None
    """The epoch that committed the last step."""
    steps_committed: int = 0
    committed_at: float | None = None
    error: str | None = None
    """Why it could not be read."""


class Recovery(Record):
    """``/pairs/{pair}/recovery``: after an unplanned failover, the services held until
    an operator acknowledges, for the term (epoch) that holds them."""

    epoch: int
    cause: str
    from_node: str | None = None
    to_node: Name
    held: list[str] = Field(default_factory=list)
    state: Literal["awaiting", "acknowledged"] = "awaiting"
    at: float = Field(default_factory=now_wall)
    acked_by: str | None = None
    acked_at: float | None = None
    contexts: dict[str, HeldContext] | None = None
    """Per held service, once the new active has read them (pairs with a database)."""


class Event(Record):
    kind: str
    pair: str | None = None
    node: str | None = None
    epoch: int | None = None
    reason: str = ""
    at: float = Field(default_factory=now_wall)
    details: dict[str, Any] = Field(default_factory=dict)


class TopologyDoc(Record):
    """``/topology/site``: the validated site as applied, with who applied it."""

    site: dict[str, Any]
    applied_by: str = "operator"
    applied_at: float = Field(default_factory=now_wall)


R = TypeVar("R", bound=Record)


def decode(model: type[R], raw: bytes, key: str) -> R:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(key, [f"not JSON ({err})"]) from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RecordError(key, format_errors(err)) from None


def decode_shared(model: type[R], raw: bytes, key: str) -> R:
    """:func:`decode`, remembered while the value is unchanged: an agent reads the same
    keys of its pair ten times a second, and decoding them again was most of its idle
    work. The record returned is shared by every caller: read it, never change it."""
    return cast(R, _remembered(model, raw, key))


@functools.lru_cache(maxsize=1024)
def _remembered(model: type[Record], raw: bytes, key: str) -> Record:
    # A value that does not decode raises, and is not remembered: rare, and each
    # caller logs it once per revision.
    return decode(model, raw, key)
