"""The ``vip:`` section of a pair: a virtual IP address that follows the active node.

Shape in the site file::

    vip:
      address: 10.0.0.100/24     # IPv4 address with its prefix length
      interface: eth0            # the interface it is added to on every node of the pair

Used by the site file (``hapair.shared.topology``) and by the agent (``hapair.workshop_agent.vip``).
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import Field, field_validator

from hapair.shared.model import StrictModel

# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no slash, no blank, no colon
# (``eth0:1`` is an address label, not an interface).
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class Vip(StrictModel):
    """A virtual IPv4 address held by the active node of a pair, announced by
    gratuitous ARP when it moves."""

    address: str = Field(
        description="the IPv4 address and its prefix length, 10.0.0.100/24: a host address "
        "of its subnet that no node owns"
    )
    interface: str = Field(description="the network interface, the same name on every node")
    arp_count: int = Field(3, ge=1, le=10, description="gratuitous ARP packets sent on takeover")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        text = value.strip()
        if "/" not in text:
            raise ValueError(
                f"{value!r} has no prefix length: give ADDRESS/PREFIX, e.g. 10.0.0.100/24"
            )
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address with a prefix length") from None
        if iface.version != 4:
            raise ValueError(
                f"{value!r}: only IPv4 virtual addresses are supported (gratuitous ARP is IPv4)"
            )
        ip, net = iface.ip, iface.network
        if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
            raise ValueError(f"{value!r} cannot be a virtual address (loopback, multicast, ...)")
        if net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
            raise ValueError(
                f"{value!r} is the network or broadcast address of {net}, not a host address"
            )
        return str(iface)

    @field_validator("interface")
    @classmethod
    def _interface(cls, value: str) -> str:
        if not _IFNAME.match(value) or value in (".", ".."):
            raise ValueError(
                f"{value!r} is not a network interface name (1 to 15 letters, digits, "
                "'_', '.', '-'; an alias such as eth0:1 is not an interface)"
            )
        if value == "lo":
            raise ValueError("the loopback interface cannot carry a virtual address for clients")
        return value

    @property
    def ip(self) -> str:
        """The bare address, ``10.0.0.100``."""
        return str(ipaddress.ip_interface(self.address).ip)
