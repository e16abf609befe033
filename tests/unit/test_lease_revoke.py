"""The watchdog's one gRPC call without grpc: protobuf fields, HTTP/2 frames, HPACK
literals, and reading a unary answer from a peer that plays etcd on a socket pair."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from hapair.workshop_agent import lease_revoke as lr


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (1, "01"),
        (300, "ac02"),
        ((1 << 63) - 1, "ffffffffffffffff7f"),
        (-1, "ffffffffffffffffff01"),  # an int64 below zero: ten bytes, two's complement
    ],
)
def test_varints_are_protobuf_s(value: int, wire: str) -> None:
    assert lr.varint(value).hex() == wire
    read, end = lr._read_varint(bytes.fromhex(wire), 0)
    assert end == len(wire) // 2 and lr.signed(read) == value


def test_a_lease_request_is_its_id_in_field_1_and_an_answer_s_fields_are_read() -> None:
    assert lr.lease_request(0x1A) == b"\x08\x1a"
    header = b"\x20" + lr.varint(42)  # ResponseHeader.revision (field 4)
    # LeaseTimeToLiveResponse: header, ID, TTL -1, a key (length-delimited), a fixed64
    answer = (
        b"\x0a" + bytes([len(header)]) + header
        + b"\x10" + lr.varint(0x1A)
        + b"\x18" + lr.varint(-1)
        + b"\x2a\x03abc"
        + b"\x31" + bytes(8)
    )  # fmt: skip
    got = lr.fields(answer)
    assert got[1] == header and got[2] == 0x1A and got[5] == b"abc"
    assert isinstance(got[3], int) and lr.signed(got[3]) == -1
    with pytest.raises(ValueError, match="truncated"):
        lr.fields(b"\x08\xff")


def hpack_literals(block: bytes) -> list[tuple[str, str]]:
    """Decode literal-without-indexing headers with new names (all the request uses)."""
    out, at = [], 0
    while at < len(block):
        assert block[at] == 0, "a literal without indexing, new name"
        at += 1
        pair = []
        for _ in range(2):
            size, at = block[at], at + 1
            assert size < 127
            pair.append(block[at : at + size].decode())
            at += size
        out.append((pair[0], pair[1]))
    return out


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 3], "big")
        kind, flags, stream = struct.unpack(">BBI", data[at + 3 : at + 9])
        out.append((kind, flags, stream, data[at + 9 : at + 9 + size]))
        at += 9 + size
    return out


def test_a_request_is_the_preface_settings_headers_and_one_grpc_message() -> None:
    sent = lr.request("127.0.0.1:2379", True, lr.REVOKE, lr.lease_request(7))
    assert sent.startswith(lr.PREFACE)
    settings, headers, data = frames(sent[len(lr.PREFACE) :])
    assert settings == (lr.SETTINGS, 0, 0, b"")
    assert headers[:3] == (lr.HEADERS, lr.END_HEADERS, 1)
    assert hpack_literals(headers[3]) == [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/etcdserverpb.Lease/LeaseRevoke"),
        (":authority", "127.0.0.1:2379"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    assert data == (lr.DATA, lr.END_STREAM, 1, b"\x00\x00\x00\x00\x02\x08\x07")


def test_hpack_lengths_past_the_prefix_take_more_bytes() -> None:
    assert lr._hpack_int(126) == b"\x7e"
    assert lr._hpack_int(127) == b"\x7f\x00"
    assert lr._hpack_int(1337) == b"\x7f\xba\x09"


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


def play_etcd(*server_frames: bytes) -> tuple[bytes | None, bytes]:
    """Run ``response`` against a peer that sends ``server_frames``; its result and
    what the client sent back."""
    client, server = socket.socketpair()
    back = bytearray()

    def peer() -> None:
        server.sendall(b"".join(server_frames))
        server.shutdown(socket.SHUT_WR)  # all it says; then the client's reply is read
        server.settimeout(0.5)
        try:
            while chunk := server.recv(4096):
                back.extend(chunk)
        except TimeoutError:
            pass

    thread = threading.Thread(target=peer)
    thread.start()
    try:
        client.settimeout(2.0)
        result = lr.response(client)
    finally:
        client.close()
        thread.join()
        server.close()
    return result, bytes(back)


def test_an_answer_with_a_message_is_read_and_settings_and_pings_are_acknowledged() -> None:
    body = grpc_message(b"\x0a\x02\x20\x05")
    half = len(body) // 2
    result, back = play_etcd(
        lr.frame(lr.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64"),
        lr.frame(lr.PING, 0, 0, b"12345678"),
        lr.frame(lr.HEADERS, lr.END_HEADERS, 1, b"\x88"),  # :status 200 (never decoded)
        lr.frame(lr.DATA, 0, 1, body[:half]),
        lr.frame(lr.DATA, 0x8, 1, b"\x02" + body[half:] + b"\x00\x00"),  # padded
        lr.frame(lr.HEADERS, lr.END_HEADERS | lr.END_STREAM, 1, b"\x40"),  # trailers
    )
    assert result == b"\x0a\x02\x20\x05"
    assert frames(back) == [(lr.SETTINGS, lr.ACK, 0, b""), (lr.PING, lr.ACK, 0, b"12345678")]


def test_an_answer_without_a_message_is_a_refusal() -> None:
    result, _ = play_etcd(lr.frame(lr.HEADERS, lr.END_HEADERS | lr.END_STREAM, 1, b"\x88"))
    assert result is None


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (lr.frame(lr.RST_STREAM, 0, 1, b"\x00\x00\x00\x02"), "reset"),
        (lr.frame(lr.GOAWAY, 0, 0, bytes(8)), "GOAWAY"),
        (b"", "closed"),
    ],
)
def test_a_reset_a_goaway_or_a_closed_connection_is_an_error(frame: bytes, why: str) -> None:
    with pytest.raises(lr.RevokeError, match=why):
        play_etcd(frame)


def test_targets_are_parsed_as_the_agent_s_etcd_option() -> None:
    secure = lr.Target.parse("https://127.0.0.1:2379, https://10.0.0.2", "ca", "c", "k")
    assert secure.endpoints == (("127.0.0.1", 2379), ("10.0.0.2", 2379))
    assert secure.secure and secure.ca == Path("ca") and secure.key == Path("k")
    lab = lr.Target.parse("127.0.0.1:2379")
    assert not lab.secure and lab.ca is None
    for bad in ("https://127.0.0.1:2379", "http://a:1,https://b:2", "ftp://x", ""):
        with pytest.raises(ValueError):
            lr.Target.parse(bad)


def test_no_member_answering_is_an_error_naming_the_last() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once left: nothing listens there
    with pytest.raises(lr.RevokeError, match=f"127.0.0.1:{port}"):
        lr.revoke(lr.Target.parse(f"127.0.0.1:{port}"), 1, timeout=0.5)


def test_a_stalled_member_costs_its_timeout_and_the_budget_bounds_the_rest() -> None:
    """Members that take the connection and never answer (a frozen etcd): the first is
    given its timeout, the next is not tried once the budget is spent."""
    stalled = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        ports = [s.getsockname()[1] for s in stalled]
        target = lr.Target.parse(",".join(f"127.0.0.1:{p}" for p in ports))
        with pytest.raises(lr.RevokeError, match=f"127.0.0.1:{ports[0]}: .*gave up after 0.1 s"):
            lr.revoke(target, 1, timeout=0.3, budget=0.1)
        stalled[0].setblocking(False)
        stalled[1].setblocking(False)
        stalled[0].accept()[0].close()  # the first was connected to
        with pytest.raises(BlockingIOError):
            stalled[1].accept()  # the second never was
    finally:
        for s in stalled:
            s.close()
