"""An attacker on the network, for the peer path's tests (root, loopback only).

``send_as`` sends a UDP datagram with any source address and port (a raw socket with
its own IPv4 header: the kernel checks neither on 127.0.0.0/8); ``Sniffer`` records the
UDP datagrams that cross the loopback interface, as a capture on the plant network
would.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from dataclasses import dataclass, field

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4  # the loopback shows every packet twice: sent, then received


def send_as(source: tuple[str, int], to: tuple[str, int], payload: bytes) -> None:
    """One UDP datagram to ``to`` that claims to come from ``source``."""
    udp = struct.pack("!HHHH", source[1], to[1], 8 + len(payload), 0) + payload  # no checksum
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # IPv4, 20-byte header
        0,
        20 + len(udp),
        0,  # the kernel picks the id
        0,
        64,
        socket.IPPROTO_UDP,
        0,  # the kernel fills in the checksum
        ipaddress.IPv4Address(source[0]).packed,
        ipaddress.IPv4Address(to[0]).packed,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(ip + udp, (to[0], 0))


@dataclass(frozen=True, slots=True)
class Datagram:
    source: tuple[str, int]
    to: tuple[str, int]
    payload: bytes


@dataclass
class Sniffer:
    """Records the UDP datagrams sent to ``port`` on the loopback while running."""

    port: int
    seen: list[Datagram] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sniffer:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        sock.bind(("lo", 0))
        sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, sock: socket.socket) -> None:
        with sock:
            while not self._stop.is_set():
                try:
                    packet, addr = sock.recvfrom(65535)
                except TimeoutError:
                    continue
                if addr[2] == PACKET_OUTGOING or len(packet) < 28 or packet[9] != 17:
                    continue
                with contextlib.suppress(struct.error, ValueError):
                    self._take(packet)

    def _take(self, packet: bytes) -> None:
        header = (packet[0] & 0x0F) * 4
        sport, dport, length, _ = struct.unpack("!HHHH", packet[header : header + 8])
        if dport != self.port:
            return
        src = str(ipaddress.IPv4Address(packet[12:16]))
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        payload = packet[header + 8 : header + length]
        self.seen.append(Datagram((src, sport), (dst, dport), payload))
