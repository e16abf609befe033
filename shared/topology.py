"""The site file: workshops, pairs, nodes and services, validated at the boundary.

A site file is parsed once into frozen pydantic models. Every error names the field
path (``workshops[0].pairs[1].nodes[0].address``) and what is wrong with it; nothing
downstream ever sees an unvalidated value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hapair.shared.database import DatabaseConfig
from hapair.shared.model import StrictModel
from hapair.shared.network import Network
from hapair.shared.package import PLACEHOLDER as PACKAGE_DIR
from hapair.shared.package import Package, Sharing
from hapair.shared.plcs import Plc, plain_path

# Re-exported: the site file's callers find them here.
from hapair.shared.validation import TopologyError as TopologyError
from hapair.shared.validation import expand as expand
from hapair.shared.validation import format_errors as format_errors
from hapair.shared.validation import parse_yaml, read_file
from hapair.shared.validation import placeholders_in as placeholders_in
from hapair.shared.vip import Vip

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
ENDPOINT_NAME_PATTERN = NAME_PATTERN.removesuffix("$") + r"(\.db)?$"
"""What may have an endpoint: a service's name, or a pair's database (``PAIR.db``)."""
PLACEHOLDERS = frozenset({"node.name", "node.address", "pair.name", "epoch"})
# A user or group of the node: a name as useradd accepts it, or a number.
ACCOUNT_PATTERN = r"^([a-z_][a-z0-9_-]{0,30}\$?|[0-9]{1,10})$"
Account = Annotated[str, Field(pattern=ACCOUNT_PATTERN)]


NO_EPOCH = "placement: all (such a service starts before any term exists)"


def _check_placeholders(
    texts: Iterator[str], allowed: frozenset[str], no_epoch: str = NO_EPOCH
) -> None:
    for text in texts:
        if "epoch" in placeholders_in(text) and "epoch" not in allowed:
            raise ValueError(f"{{epoch}} in {text!r} is not available for {no_epoch}")
        if PACKAGE_DIR in placeholders_in(text) and PACKAGE_DIR not in allowed:
            raise ValueError(f"{{{PACKAGE_DIR}}} in {text!r} needs a package: for the service")
        unknown = placeholders_in(text) - allowed
        if unknown:
            names = ", ".join("{" + u + "}" for u in sorted(unknown))
            raise ValueError(
                f"unknown placeholder {names} in {text!r}; known: "
                + ", ".join("{" + p + "}" for p in sorted(allowed))
            )


class Node(StrictModel):
    name: Name = Field(
        description="the node's name, unique in the site; its agent runs with --node NAME"
    )
    address: str = Field(
        description="the server's IP address or host name: {node.address} in commands, "
        "the default host of its endpoints"
    )
    no_failover: bool = Field(
        False, description="true: this node never campaigns, so never takes the pair over itself"
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            dotted_numbers = re.fullmatch(r"[\d.]+", value) is not None
            if not dotted_numbers and re.fullmatch(
                r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", value
            ):
                return value
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None


# Below this TTL a pair rides out etcd's hiccups only on its peer path (Pair.cautions).
SHORT_LEASE_S = 2.0


class TermBeat(StrictModel):
    """``failover.term_beat``: the active renews its term in etcd every ``interval_ms``,
    and a standby takes a crashed active's pair over ``fence_ms + margin_ms`` after the
    last beat it saw (``workshop_agent/term_beat.py``)."""

    interval_ms: int = Field(
        50, ge=10, le=1000, description="milliseconds between two beats of the active"
    )
    fence_ms: int = Field(
        150,
        ge=30,
        le=10000,
        description="milliseconds: the active fences this long after sending its last "
        "acknowledged beat; at least three beats",
    )
    margin_ms: int = Field(
        150,
        ge=20,
        le=10000,
        description="milliseconds a standby waits beyond fence_ms after the last beat it "
        "saw: room for the watchdog's kill and the clocks' drift",
    )

    @model_validator(mode="after")
    def _timing(self) -> TermBeat:
        # The active asks its peers to hold once one beat is missing, and needs their
        # promise before its fence point: a third beat's time.
        if self.fence_ms < 3 * self.interval_ms:
            raise ValueError(
                f"fence_ms ({self.fence_ms}) must be at least three beats "
                f"(3 x interval_ms = {3 * self.interval_ms}): otherwise one late beat "
                "fences a healthy active before its peers can hold"
            )
        return self

    @property
    def takeover_after_s(self) -> float:
        return (self.fence_ms + self.margin_ms) / 1000


class Failover(StrictModel):
    lease_ttl_s: float = Field(
        2.0,
        ge=1.0,
        le=60.0,
        description="seconds: TTL of each agent's etcd lease, kept alive every lease_ttl_s / 4; "
        "a crashed active is replaced once its lease expires. etcd grants no lease under 1.5 "
        "of its election timeouts (2 s with its defaults, 1 s with deploy/etcd's timing)",
    )
    fence_margin_s: float = Field(
        0.5,
        gt=0.0,
        description="seconds: the active fences itself lease_ttl_s - fence_margin_s after "
        "sending its last acknowledged keepalive; at most lease_ttl_s / 2",
    )
    failback: Literal["manual", "auto"] = Field(
        "manual",
        description="manual: a recovered main server rejoins as standby and stays so; auto: "
        "the pair goes back to it once it has been a healthy standby for failback_after_s",
    )
    failback_after_s: float = Field(
        60.0,
        gt=0.0,
        description="seconds the recovered main server must be a healthy standby before an "
        "automatic failback",
    )
    campaign_delay_s: float = Field(
        0.2,
        ge=0.0,
        le=10.0,
        description="seconds a secondary waits for each more preferred node ready to "
        "campaign, so that the preferred node wins",
    )
    term_beat: TermBeat | None = Field(
        None,
        description="a finer guard of the term than the lease: a crashed active taken "
        "over in tenths of a second; "
        "needs the pair's network section",
    )

    @model_validator(mode="after")
    def _timing(self) -> Failover:
        # Keepalives go out every ttl/4; the fence point must leave room for at least two
        # of them, or one slow round trip would fence a healthy active.
        if self.fence_margin_s > self.lease_ttl_s / 2:
            raise ValueError(
                f"fence_margin_s ({self.fence_margin_s}) must be at most half of "
                f"lease_ttl_s ({self.lease_ttl_s})"
            )
        beat = self.term_beat
        if beat is not None and beat.takeover_after_s >= self.fence_after_s:
            raise ValueError(
                f"term_beat takes a pair over {beat.takeover_after_s:g} s after the last "
                f"beat (fence_ms + margin_ms), which must be below the lease's fence point "
                f"({self.fence_after_s:g} s, lease_ttl_s - fence_margin_s): the lease alone "
                "is as fast, without the beat's writes"
            )
        return self

    @property
    def keepalive_interval_s(self) -> float:
        return self.lease_ttl_s / 4

    @property
    def fence_after_s(self) -> float:
        """Time from the send of the last acknowledged keepalive to self-fencing."""
        return self.lease_ttl_s - self.fence_margin_s


class Restart(StrictModel):
    max_restarts: int = Field(
        3,
        ge=0,
        description="restarts allowed within window_s; one more failure: the active resigns",
    )
    window_s: float = Field(60.0, gt=0.0, description="seconds: the budget's sliding window")
    backoff_s: float = Field(0.2, ge=0.0, description="seconds waited before each restart")


class Health(StrictModel):
    tcp: str | None = Field(None, description="HOST:PORT: healthy when it accepts a connection")
    http: str | None = Field(
        None,
        description="an http:// or https:// URL: healthy when it answers with a status from "
        "200 to 399 (redirects not followed)",
    )
    command: list[str] | None = Field(
        None,
        description="argv: healthy when it exits with status 0; run as the service's user, "
        "with its environment",
    )
    interval_s: float = Field(1.0, gt=0.0, description="seconds between two checks")
    timeout_s: float = Field(1.0, gt=0.0, description="seconds: a slower check has failed")
    failures: int = Field(
        3, ge=1, description="consecutive failed checks before the service counts as failed"
    )
    start_period_s: float = Field(
        30.0,
        gt=0.0,
        description="seconds the service has after its start to pass a first check; "
        "failing that, it has failed",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Health:
        kinds = [k for k in ("tcp", "http", "command") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"give one of tcp, http or command, not {' and '.join(kinds)}")
        if self.tcp is not None and not _host_port(self.tcp):
            raise ValueError(f"tcp must be HOST:PORT with a port from 1 to 65535, got {self.tcp!r}")
        if self.http is not None and not self.http.startswith(("http://", "https://")):
            raise ValueError(f"http must be an http:// or https:// URL, got {self.http!r}")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        return self

    @property
    def kind(self) -> str:
        for k in ("tcp", "http", "command"):
            if getattr(self, k) is not None:
                return k
        return "process"

    def texts(self) -> Iterator[str]:
        yield from (t for t in (self.tcp, self.http) if t is not None)
        yield from self.command or []


def _host_port(text: str) -> bool:
    match = re.fullmatch(r".+:(\d{1,5}|\{[a-z.]+\})", text)
    return match is not None and (not match.group(1).isdigit() or 1 <= int(match.group(1)) <= 65535)


class EndpointSpec(StrictModel):
    """``endpoint:`` of a service in the site file: what its active node publishes."""

    port: int = Field(ge=1, le=65535, description="the port published to clients")
    protocol: Annotated[str, Field(pattern=r"^[a-z][a-z0-9+.-]{0,31}$")] = Field(
        "tcp", description="free text for clients: http, opc.tcp, postgresql, ..."
    )
    host: str | None = Field(
        None,
        description="the published host, for a service reached under another name; "
        "unset: the node's address",
    )


class Service(StrictModel):
    name: Name = Field(
        description="the service's name, unique in the site: clients look it up by it"
    )
    command: list[str] = Field(
        min_length=1,
        description="argv, never a shell string: the first item a path or a program on the "
        "service's PATH; placeholders expanded",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="the service's own environment variables, after those hapair sets "
        "(placeholders expanded); they may set PATH",
    )
    cwd: str | None = Field(None, description="working directory; unset: the agent's")
    user: Account | None = Field(
        None,
        description="who the service and its health command run as, a name or a uid; unset: "
        "the node's --service-user, else the agent's own user; root only where the node "
        "allows it",
    )
    group: Account | None = Field(
        None,
        description="its group, a name or a gid; unset: the node's --service-group, else the "
        "user's own group",
    )
    placement: Literal["active", "all"] = Field(
        "active",
        description="active: runs on the active node only; all: on every node of the pair, "
        "never stopped by a failover",
    )
    critical: bool = Field(
        False,
        description="true: its exit or failed health check on the active makes the active "
        "resign at once; false: restarted in place within the restart budget first",
    )
    restart: Restart = Field(
        default_factory=Restart,
        description="the restart budget: past it, a failure makes the active resign",
    )
    health: Health | None = Field(
        None, description="the health check; unset: healthy while its process lives"
    )
    endpoint: EndpointSpec | None = Field(
        None,
        description="what the active node publishes for clients; unset: supervised, not published",
    )
    stop_grace_s: float = Field(
        5.0,
        ge=0.0,
        le=300.0,
        description="seconds between SIGTERM and SIGKILL when the service is stopped",
    )
    hold_until_ack: bool = Field(
        False,
        description="true (placement: active only): after an unplanned failover the new "
        "active starts it only once an operator acknowledges the recovery (hapair ack)",
    )
    auto_ack_after_s: float | None = Field(
        None,
        gt=0.0,
        description="with hold_until_ack: seconds after which a held service starts without "
        "an acknowledgement; unset: never",
    )
    process: Name | None = Field(
        None,
        description="with hold_until_ack: the process context (hapair.shared.process_context) "
        "the service drives, shown to the operator while it is held; unset: the service's name",
    )
    package: Package | None = Field(
        None,
        description="the software every node of the pair fetches, checks and installs for "
        "it, in {package.dir}",
    )

    @model_validator(mode="after")
    def _hold(self) -> Service:
        if self.hold_until_ack and self.placement != "active":
            raise ValueError("hold_until_ack applies to placement: active services only")
        if self.auto_ack_after_s is not None and not self.hold_until_ack:
            raise ValueError("auto_ack_after_s needs hold_until_ack: true")
        if self.process is not None and not self.hold_until_ack:
            raise ValueError("process names what a held service resumes: it needs hold_until_ack")
        return self

    @property
    def process_name(self) -> str:
        """The process context this service resumes from when held."""
        return self.process or self.name

    @model_validator(mode="after")
    def _placeholders(self) -> Service:
        # A service on every node starts before any epoch exists, so {epoch} means nothing.
        allowed = PLACEHOLDERS if self.placement == "active" else PLACEHOLDERS - {"epoch"}
        if self.package is not None:
            allowed |= {PACKAGE_DIR}
        texts = [*self.command, *self.env.values(), *(self.health.texts() if self.health else [])]
        if self.cwd:
            texts.append(self.cwd)
        _check_placeholders(iter(texts), allowed)
        if self.package is not None and self.package.install is not None:
            # Run once per node and version, outside any term.
            _check_placeholders(
                iter(self.package.install.command),
                allowed - {"epoch"},
                "package.install (run once per node and version, outside any term)",
            )
        return self


class OpcUaSecurity(StrictModel):
    """How the pair's comm server guards its OPC UA server (hapair-comm)."""

    security: Literal["on", "none"] = Field(
        "on",
        description="on: signed and encrypted endpoints only, users from the comm server's "
        "users file; none (labs): NoSecurity, anyone may read and write",
    )
    anonymous: Literal["refused", "read"] = Field(
        "refused", description="read: clients without a user may read and subscribe"
    )


class Pair(StrictModel):
    name: Name = Field(description="the pair's name, unique in the site")
    nodes: list[Node] = Field(
        min_length=2,
        description="the pair's servers in priority order: the first is the main server, "
        "the others secondaries by preference",
    )
    failover: Failover = Field(
        default_factory=Failover, description="the lease's timing and the failback policy"
    )
    services: list[Service] = Field(
        default_factory=list,
        description="started in this order (on the active node, or on every node), stopped "
        "in reverse order",
    )
    network: Network | None = Field(
        None,
        description="the peer path between the agents and the probes that detect network "
        "faults; unset: neither",
    )
    database: DatabaseConfig | None = Field(
        None, description="the pair's PostgreSQL, replicated by the agents; unset: none"
    )
    vip: Vip | None = Field(None, description="a virtual IP address held by the active node")
    plcs: list[Plc] = Field(
        default_factory=list, description="what the pair's comm server (hapair-comm) polls"
    )
    opcua: OpcUaSecurity = Field(
        default_factory=OpcUaSecurity,
        description="how the pair's comm server guards its OPC UA server",
    )
    packages: Sharing = Field(
        default_factory=Sharing,
        description="whether the nodes fetch the services' packages from each other first",
    )

    @model_validator(mode="after")
    def _unique(self) -> Pair:
        _check_unique(
            [
                ("node name", [(n.name, f"nodes[{i}].name") for i, n in enumerate(self.nodes)]),
                (
                    "node address",
                    [(n.address, f"nodes[{i}].address") for i, n in enumerate(self.nodes)],
                ),
                (
                    "service name",
                    [(s.name, f"services[{i}].name") for i, s in enumerate(self.services)],
                ),
                (
                    "endpoint port",
                    [
                        (str(s.endpoint.port), f"services[{i}].endpoint.port")
                        for i, s in enumerate(self.services)
                        if s.endpoint and not s.endpoint.host
                    ]
                    + ([(str(self.database.port), "database.port")] if self.database else [])
                    + (
                        [(str(self.packages.peer_port), "packages.peer_port")]
                        if self.packages.from_peers
                        else []
                    ),
                ),
                ("PLC name", [(p.name, f"plcs[{i}].name") for i, p in enumerate(self.plcs)]),
            ]
        )
        return self

    def cautions(self) -> list[str]:
        """Valid choices with a cost worth saying (see Site.cautions)."""
        said = []
        f = self.failover
        if f.lease_ttl_s < SHORT_LEASE_S and self.network is None:
            said.append(
                f"lease_ttl_s {f.lease_ttl_s:g} without a network: section: the active fences "
                f"itself whenever etcd answers {f.fence_after_s:g} s late (a leader "
                "election, a slow disk), as no peer path can hold the pair meanwhile"
            )
        return said

    @model_validator(mode="after")
    def _beat_held(self) -> Pair:
        # Only the peers' promises keep an active whose beats an etcd stall holds up:
        # without them every stall longer than fence_ms would move the pair.
        if self.failover.term_beat is not None and self.network is None:
            raise ValueError(
                "failover.term_beat needs the pair's network section (its peer path): "
                "without it an etcd stall longer than fence_ms fences the active and "
                "moves the pair"
            )
        return self

    @model_validator(mode="after")
    def _vip_apart(self) -> Pair:
        # Fencing removes the virtual address: were it a node's own, fencing would cut
        # that node off.
        if self.vip is not None:
            for i, n in enumerate(self.nodes):
                if n.address == self.vip.ip:
                    raise ValueError(
                        f"vip.address {self.vip.ip} is the address of nodes[{i}] ({n.name}): "
                        "a virtual address must be one no node owns"
                    )
        return self

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def rank(self, name: str) -> int:
        """Priority rank of a node: 0 for the main server."""
        return next(i for i, n in enumerate(self.nodes) if n.name == name)


class Workshop(StrictModel):
    name: Name = Field(description="the workshop's name, unique in the site")
    pairs: list[Pair] = Field(default_factory=list, description="the workshop's pairs")


class Site(StrictModel):
    site: Name = Field(description="the site's name")
    workshops: list[Workshop] = Field(min_length=1, description="the site's workshops")

    @model_validator(mode="after")
    def _unique(self) -> Site:
        pairs = [
            (f"workshops[{w}].pairs[{i}]", p)
            for w, ws in enumerate(self.workshops)
            for i, p in enumerate(ws.pairs)
        ]
        _check_unique(
            [
                (
                    "workshop name",
                    [(w.name, f"workshops[{i}].name") for i, w in enumerate(self.workshops)],
                ),
                ("pair name", [(p.name, f"{at}.name") for at, p in pairs]),
                (
                    "node name",
                    [
                        (n.name, f"{at}.nodes[{i}].name")
                        for at, p in pairs
                        for i, n in enumerate(p.nodes)
                    ],
                ),
                # One server, one pair: an address in two pairs is a typo or a second agent.
                (
                    "node address",
                    [
                        (n.address, f"{at}.nodes[{i}].address")
                        for at, p in pairs
                        for i, n in enumerate(p.nodes)
                    ],
                ),
                (
                    "service name",
                    [
                        (s.name, f"{at}.services[{i}].name")
                        for at, p in pairs
                        for i, s in enumerate(p.services)
                    ],
                ),
                (
                    "virtual address",
                    [(p.vip.ip, f"{at}.vip.address") for at, p in pairs if p.vip is not None],
                ),
            ]
        )
        return self

    def pairs(self) -> Iterator[Pair]:
        for w in self.workshops:
            yield from w.pairs

    def cautions(self) -> list[str]:
        """Choices that are valid but that a plant should make knowingly, one line each."""
        return [f"pair {p.name}: {c}" for p in self.pairs() for c in p.cautions()]

    def pair(self, name: str) -> Pair | None:
        return next((p for p in self.pairs() if p.name == name), None)

    def workshop_of(self, pair: str) -> str | None:
        return next((w.name for w in self.workshops for p in w.pairs if p.name == pair), None)

    def pair_of_node(self, node: str) -> Pair | None:
        return next((p for p in self.pairs() if p.node(node) is not None), None)

    def pair_of_database(self, service: str) -> Pair | None:
        """The pair whose database endpoint is ``service`` (``{pair}.db``)."""
        name, dot, suffix = service.rpartition(".")
        pair = self.pair(name) if dot and suffix == "db" else None
        return pair if pair is not None and pair.database is not None else None

    def pair_of_service(self, service: str) -> tuple[Pair, Service] | None:
        for p in self.pairs():
            for s in p.services:
                if s.name == service:
                    return p, s
        return None


def _check_unique(groups: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """Refuse duplicates, naming every place each duplicate value appears."""
    problems = []
    for what, items in groups:
        where: dict[str, list[str]] = {}
        for value, path in items:
            where.setdefault(value, []).append(path)
        problems += [
            f"duplicate {what} {value!r} at {', '.join(paths)}"
            for value, paths in where.items()
            if len(paths) > 1
        ]
    if problems:
        raise ValueError("; ".join(problems))


def site_schema() -> dict[str, Any]:
    """The site file's JSON Schema, from the models that read it: editors validate and
    complete site files with it (for YAML: ``# yaml-language-server: $schema=FILE``)."""
    schema = Site.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hapair site file",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def parse_site(data: object, source: str) -> Site:
    try:
        return Site.model_validate(data)
    except ValidationError as err:
        raise TopologyError(source, [plain_path(p) for p in format_errors(err)]) from None


def loads(text: str, source: str = "<text>") -> Site:
    data = parse_yaml(text, source, TopologyError)
    if not isinstance(data, dict):
        raise TopologyError(source, ["(top level): expected a mapping with site and workshops"])
    return parse_site(data, source)


def load(path: str | Path) -> Site:
    return loads(read_file(path, TopologyError), str(path))


def placeholder_values(pair: Pair, node: Node, epoch: int | None) -> dict[str, str]:
    values = {"node.name": node.name, "node.address": node.address, "pair.name": pair.name}
    if epoch is not None:
        values["epoch"] = str(epoch)
    return values
