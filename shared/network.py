"""The ``network:`` section of a pair: what a healthy node of that workshop must reach.

Used by the site file (``hapair.shared.topology``) and by the agent's probes."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from hapair.shared.model import StrictModel

# Probe intervals without an answer before a peer is "not visible" or a target "lost":
# one lost datagram is noise, three in a row are a fault.
MISSES = 3
# A probe waits at most this long (and never longer than the interval, so rounds never
# overlap): an answer later than that on a plant LAN means the path is unusable anyway.
MAX_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed probe target: ``port`` None means an ICMP echo."""

    host: str
    port: int | None

    def __str__(self) -> str:
        if self.port is None:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_LISTEN = re.compile(r"(?:\[(?P<v6>[^\[\]]*)\]|(?P<host>[^\[\]]*)):(?P<port>\d{1,5})", re.ASCII)


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` a daemon listens on: a host name or IPv4 address, an IPv6 address in
    brackets (``[::1]:8700``), or no host for every IPv4 address (``:8700``); the port
    from 1 to 65535. ValueError saying what is wrong otherwise."""
    value = text.strip()
    match = _LISTEN.fullmatch(value)
    if match is None:
        host, sep, _ = value.rpartition(":")
        if not sep:
            why = "no port"
        elif "[" in host or "]" in host:
            why = "an IPv6 address goes in brackets, then the port: [::1]:8700"
        elif ":" in host:
            why = f"an IPv6 address goes in brackets: [{host}]:PORT"
        else:
            why = "the port must be a number"
        raise ValueError(f"expected HOST:PORT, got {text!r}: {why}")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}: the port must be from 1 to 65535")
    if match["v6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["v6"])), port
        except ValueError:
            raise ValueError(
                f"expected HOST:PORT, got {text!r}: {match['v6']!r} in brackets is no IPv6 address"
            ) from None
    host = match["host"]
    if ":" in host:
        raise ValueError(f"expected HOST:PORT, got {text!r}: an IPv6 address goes in brackets")
    if any(c.isspace() or c == "/" for c in host):
        raise ValueError(f"expected HOST:PORT, got {text!r}: {host!r} is no host name or address")
    return host or "0.0.0.0", port


def parse_target(text: str) -> Target:
    """``10.0.0.1`` (ICMP), ``10.0.0.1:502`` or ``[fd00::1]:502`` (TCP connect).

    Only IP addresses: a name server outage must not look like network isolation."""
    text = text.strip()
    match = re.fullmatch(r"\[([^\]]+)\]:(\w+)|([^:]+):(\w+)|([^\[\]]+)", text)
    if match is None:
        raise ValueError(f"{text!r} is not ADDRESS, ADDRESS:PORT or [IPV6]:PORT")
    host = match[1] or match[3] or match[5]
    port = match[2] or match[4]
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port} is not from 1 to 65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (probe targets are never names)") from None
    if port is None and ip.version == 6:
        raise ValueError(f"ICMP probes are IPv4 only; give [{ip}]:PORT for a TCP probe instead")
    return Target(str(ip), int(port) if port is not None else None)


def _normalized_target(text: str) -> str:
    return str(parse_target(text))


class Network(StrictModel):
    """``network:`` of a pair: what a healthy node of that workshop must reach."""

    probe_targets: tuple[Annotated[str, AfterValidator(_normalized_target)], ...] = Field(
        default=(),
        max_length=32,
        description="IP addresses a healthy node of the workshop reaches: ADDRESS probed with "
        "ICMP echo, ADDRESS:PORT with a TCP connect",
    )
    probe_interval_s: float = Field(
        1.0,
        ge=0.05,
        le=60.0,
        description="seconds between two probes of each peer and target; three unanswered: "
        "not visible, or lost",
    )
    isolation_after_s: float = Field(
        5.0,
        gt=0.0,
        le=3600.0,
        description="seconds an active may reach none of its probe targets before it is "
        "isolated and hands the pair to a standby that reaches them; at least twice "
        "probe_interval_s",
    )
    peer_port: int = Field(
        7400,
        ge=1,
        le=65535,
        description="the UDP port of the peer path between the pair's agents (pings, holds "
        "and promises)",
    )
    # The pair's key for the peer path: a file on each node (``hapair pki peer-key``),
    # never the key itself, which must not be in the site file nor in etcd. Unset: the
    # lab mode, where anyone on the network can speak for a peer.
    peer_key_file: str | None = Field(
        None,
        min_length=2,
        max_length=4096,
        description="absolute path on each node of the pair's peer key (hapair pki peer-key), "
        "never the key itself; unset: the lab mode, unauthenticated",
    )

    @field_validator("peer_key_file")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if re.fullmatch(r"[0-9A-Fa-f]{32,}", value.strip()):
            raise ValueError(
                "this is a key, not the path of its file: the key must never be in the "
                "site file (write it with hapair pki peer-key DIR PAIR, copy it to each "
                "node, and name the file here)"
            )
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @field_validator("probe_targets")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen = [t for i, t in enumerate(value) if t in value[:i]]
        if seen:
            raise ValueError(f"{seen[0]} is listed twice")
        return value

    @field_validator("isolation_after_s")
    @classmethod
    def _after_two_probes(cls, value: float, info: ValidationInfo) -> float:
        # One lost probe must never isolate a node: leave room for at least two.
        interval = info.data.get("probe_interval_s")
        if interval is not None and value < 2 * interval:
            raise ValueError(
                f"isolation_after_s ({value}) must be at least twice probe_interval_s ({interval})"
            )
        return value

    @property
    def timeout_s(self) -> float:
        return min(MAX_TIMEOUT_S, self.probe_interval_s)

    @property
    def visible_within_s(self) -> float:
        """A peer unanswered this long is not visible; a target, lost."""
        return self.probe_interval_s * MISSES

    def targets(self) -> list[Target]:
        return [parse_target(t) for t in self.probe_targets]
