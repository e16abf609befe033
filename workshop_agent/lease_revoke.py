"""Revoking an etcd lease with the standard library alone: one gRPC call over HTTP/2.

The watchdog ends the term of its dead agent by revoking the agent's lease, but it must
stay small and start at once: no grpc, no aetcd, no pydantic. etcd's JSON gateway does
not authenticate by the client certificate's CN (with auth on, etcd 3.4 answers a gateway
request from a certificate that has one with 400, "CommonName of client sending a request
against gateway will be ignored"), so the watchdog speaks gRPC itself: TLS with the agent's
certificate (ALPN ``h2``), or plain HTTP/2 in the lab mode, one stream, one unary call.
etcd then runs the call as the agent's own etcd user, with the agent's role.

Only what a unary call needs is here: the connection preface, SETTINGS and PING answered,
request headers as HPACK literals (no table, no Huffman code), the response's DATA read.
The response's headers are never decoded: a unary gRPC call that fails sends no message,
so an answer carrying a message is a success, and one without is a refusal whose reason
this module does not read. A refused revoke is followed by a ``LeaseTimeToLive`` call,
which tells a lease already gone (TTL -1: expired, or revoked by its agent) from one
that lives on.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hapair.workshop_agent.etcd_target import Target

if TYPE_CHECKING:
    import ssl

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
STREAM = 1  # the one stream of a connection
REVOKE = "/etcdserverpb.Lease/LeaseRevoke"
TIME_TO_LIVE = "/etcdserverpb.Lease/LeaseTimeToLive"


class RevokeError(Exception):
    """The lease could not be revoked (and is not known to be gone)."""


# ---- protobuf: the few fields these calls carry -------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # an int64 below zero is sent as its two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def lease_request(lease: int) -> bytes:
    """``LeaseRevokeRequest`` and ``LeaseTimeToLiveRequest`` alike: ``ID`` is field 1."""
    return b"\x08" + varint(lease)


def fields(message: bytes) -> dict[int, int | bytes]:
    """The varint and length-delimited fields of a message (the last of each number)."""
    out: dict[int, int | bytes] = {}
    at = 0
    while at < len(message):
        tag, at = _read_varint(message, at)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            out[number], at = _read_varint(message, at)
        elif kind == 2:
            size, at = _read_varint(message, at)
            out[number], at = message[at : at + size], at + size
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {kind} not expected")
    return out


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def signed(value: int) -> int:
    """An int64 read as a varint (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# ---- HTTP/2 ---------------------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """Each header a literal without indexing, its name new, no Huffman code."""
    out = bytearray()
    for name, value in headers:
        out.append(0)
        for text in (name.encode(), value.encode()):
            out += _hpack_int(len(text)) + text
    return bytes(out)


def request(authority: str, secure: bool, path: str, message: bytes) -> bytes:
    """Everything a client sends for one unary call, from the preface on."""
    headers = [
        (":method", "POST"),
        (":scheme", "https" if secure else "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    body = b"\x00" + struct.pack(">I", len(message)) + message  # not compressed
    return (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_HEADERS, STREAM, header_block(headers))
        + frame(DATA, END_STREAM, STREAM, body)
    )


class Reader:
    """Frames from a socket, whole."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RevokeError("etcd closed the connection")
            self.buffer += chunk
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def next(self) -> tuple[int, int, int, bytes]:
        head = self._take(9)
        size = int.from_bytes(head[:3], "big")
        kind, flags, stream = struct.unpack(">BBI", head[3:])
        return kind, flags, stream & 0x7FFFFFFF, self._take(size)


def response(sock: socket.socket | ssl.SSLSocket) -> bytes | None:
    """Read until the call's stream ends; its message, None if it sent none (refused)."""
    reader = Reader(sock)
    data = b""
    while True:
        kind, flags, stream, payload = reader.next()
        if kind == SETTINGS and not flags & ACK:
            sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            raise RevokeError("etcd sent GOAWAY")
        elif stream == STREAM and kind == RST_STREAM:
            raise RevokeError("etcd reset the call")
        elif stream == STREAM and kind == DATA:
            data += _unpad(flags, payload)
        if stream == STREAM and kind in (DATA, HEADERS) and flags & END_STREAM:
            break
    if len(data) < 5:
        return None
    size = struct.unpack(">I", data[1:5])[0]
    return data[5 : 5 + size]


def _unpad(flags: int, payload: bytes) -> bytes:
    if flags & 0x8:  # PADDED
        return payload[1 : len(payload) - payload[0]]
    return payload


# ---- the calls ----------------------------------------------------------------------


def _connect(target: Target, host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    if not target.secure:
        return sock
    import ssl  # only now: an idle watchdog does not carry OpenSSL (about 4 MiB)

    context = ssl.create_default_context(cafile=str(target.ca))
    if target.cert is not None and target.key is not None:
        context.load_cert_chain(str(target.cert), str(target.key), password=lambda: b"")
    context.set_alpn_protocols(["h2"])
    try:
        tls = context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    if tls.selected_alpn_protocol() != "h2":
        tls.close()
        raise RevokeError(f"{host}:{port} does not speak HTTP/2 over TLS")
    return tls


Opened = tuple[str, int, socket.socket]  # a member's host and port, a connection to it


BUDGET_S = 2.0
"""No further member is tried once this is spent: the lease expires on its own anyway,
and a restarted agent waits for this process's end (the node lock)."""


def connect_first(target: Target, timeout: float = 1.0, budget: float = BUDGET_S) -> Opened:
    """A connection to the first member that takes one, made ahead of a call."""
    why = "no etcd member"
    until = time.monotonic() + budget
    for host, port in target.endpoints:
        if time.monotonic() >= until:
            break
        try:
            return host, port, _connect(target, host, port, timeout)
        except (OSError, RevokeError) as err:
            why = f"{host}:{port}: {err}"
    raise RevokeError(why)


def call(
    target: Target,
    host: str,
    port: int,
    path: str,
    message: bytes,
    timeout: float,
    sock: socket.socket | None = None,
) -> bytes | None:
    """One unary call to one member (on ``sock``, a new connection to it, if given):
    its answer, None if refused."""
    with contextlib.closing(sock or _connect(target, host, port, timeout)) as conn:
        conn.settimeout(timeout)
        conn.sendall(request(f"{host}:{port}", target.secure, path, message))
        return response(conn)


def revoke(
    target: Target,
    lease: int,
    timeout: float = 1.0,
    opened: Opened | None = None,
    budget: float = BUDGET_S,
) -> str:
    """Revoke ``lease`` on the first member that answers (the one ``opened`` reaches
    first, if given): ``revoked``, or ``gone`` (etcd refused because it had no such
    lease any more); :class:`RevokeError` otherwise.

    Members are tried in turn while ``budget`` lasts; each connect, read and write waits
    ``timeout`` seconds at most (a stalled member costs about that, then the next is
    tried)."""
    why = "no etcd member"
    until = time.monotonic() + budget
    message = lease_request(lease)
    endpoints = list(target.endpoints)
    if opened is not None:
        endpoints.remove((opened[0], opened[1]))
        endpoints.insert(0, (opened[0], opened[1]))
    for host, port in endpoints:
        sock = opened[2] if opened is not None and (host, port) == opened[:2] else None
        if sock is None and time.monotonic() >= until:
            why += f"; gave up after {budget:g} s"
            break
        try:
            if call(target, host, port, REVOKE, message, timeout, sock) is not None:
                return "revoked"
            answer = call(target, host, port, TIME_TO_LIVE, message, timeout)
        except (OSError, RevokeError) as err:  # ssl.SSLError is an OSError
            why = f"{host}:{port}: {err}"
            continue
        if answer is None:
            why = f"{host}:{port} refused the revoke and the lease's time to live"
            continue
        ttl = fields(answer).get(3, 0)  # LeaseTimeToLiveResponse.TTL
        if isinstance(ttl, int) and signed(ttl) < 0:
            return "gone"
        raise RevokeError(f"{host}:{port} refused to revoke a lease that lives on")
    raise RevokeError(why)
